"""Safe loading, folder names and the network: nothing unpickles user files, nothing escapes, nothing connects.

A malicious pickle (its payload creates a folder) is planted wherever the library reads a ``.pt``/``.bin``
file: encoder resume, training resume, initial weights, the pipeline's stage artefacts, and the weights of
pretrained models. Every one must be refused with a clear error and the payload must never run. A scan of
the library's source checks that every ``torch.load`` passes ``weights_only=True`` and that nothing calls
``pickle``, ``np.load(allow_pickle=True)``, ``yaml.load`` or similar. Class names never become paths, and
``import dreamood`` plus offline use of pretrained folders make no network connection.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dreamood
from dreamood.anchors import TokenEmbeddings
from dreamood.encoder import CHECKPOINT_NAME, TextConditionedEncoder, fit_encoder
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.io import load_checkpoint
from dreamood.training import TrainingConfig, train_classifier

PACKAGE_DIR = Path(dreamood.__file__).resolve().parent
REPO = PACKAGE_DIR.parent


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _plant(path: Path, state: dict[str, Any], marker: Path) -> Path:
    """Write ``state`` plus the payload as a torch checkpoint at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "extra": _Payload(marker)}, path, pickle_module=pickle)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PAYLOAD-RAN"
    yield path
    assert not path.exists(), "the malicious pickle was executed"


def _loader() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.arange(8) % 2), batch_size=4)


# ---- malicious pickles wherever the library reads a .pt or .bin file --------------------------------------------


def test_encoder_resume_refuses_a_malicious_checkpoint(tmp_path: Path, marker: Path) -> None:
    encoder = TextConditionedEncoder(nn.Linear(4, 6), 6, torch.eye(2, 3))
    _plant(tmp_path / CHECKPOINT_NAME, {"epoch": 1, "steps_per_epoch": 2, "model": encoder.state_dict()}, marker)
    with pytest.raises(ArtifactError, match=r"cannot be loaded safely \(weights_only=True\)"):
        fit_encoder(encoder, _loader(), 2, device="cpu", checkpoint_dir=tmp_path, resume=True, show_progress=False)


def test_training_resume_refuses_a_malicious_checkpoint(tmp_path: Path, marker: Path) -> None:
    model = nn.Linear(4, 2)
    _plant(tmp_path / "checkpoint.pt", {"format": "dreamood.training", "model": model.state_dict()}, marker)
    with pytest.raises(ArtifactError, match=r"checkpoint\.pt cannot be loaded safely"):
        train_classifier(
            model, _loader(), TrainingConfig(epochs=1), device="cpu", progress=False, output_dir=tmp_path, resume=True
        )


def test_initial_weights_refuse_a_malicious_checkpoint(tmp_path: Path, marker: Path) -> None:
    model = nn.Linear(4, 2)
    path = _plant(tmp_path / "init.pt", dict(model.state_dict()), marker)
    with pytest.raises(ArtifactError, match=r"init\.pt cannot be loaded safely"):
        train_classifier(model, _loader(), TrainingConfig(epochs=1), device="cpu", progress=False, init_checkpoint=path)


def test_load_checkpoint_refuses_a_payload_hidden_in_a_nested_container(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"history": [{"loss": 0.5, "note": [_Payload(marker)]}]}, path, pickle_module=pickle)
    with pytest.raises(ArtifactError, match="weights_only=True"):
        load_checkpoint(path)


@pytest.mark.parametrize("stage", ["encoder", "classifier"])
def test_pipeline_stage_artefacts_refuse_malicious_checkpoints(stage: str, tmp_path: Path, marker: Path) -> None:
    pipeline = pytest.importorskip("dreamood.pipeline")
    from dreamood.config import load_config

    config = load_config(
        "cifar100",
        {"output_dir": str(tmp_path), "encoder.backbone": "small", "training.backbone": "small", "device": "cpu"},
    )
    images = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    data = pipeline.PipelineData(["cat", "dog"], images, images, images, {"noise": images})
    TokenEmbeddings(["cat", "dog"], torch.eye(2, 8) + 0.1).save(tmp_path / "anchors.safetensors")
    _plant(tmp_path / pipeline.stage_named(stage).artifact, {"model": {}}, marker)
    with pytest.raises(ArtifactError, match="cannot be loaded safely"):
        pipeline.Pipeline(config, data).load(stage)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dreamood.testing import tiny_stable_diffusion_pipeline, write_tiny_clip_tokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion_pipeline(root / "tokenizer").save_pretrained(str(root / "sd"))
    write_tiny_clip_tokenizer(root / "sd" / "tokenizer")
    return root / "sd"


def _replace_weights_with_pickle(folder: Path, name: str, marker: Path) -> None:
    """Swap a component's safetensors weights for a pickled ``.bin`` holding the same tensors and the payload."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for weights in folder.glob("*.safetensors"):
        state.update(load_file(weights))
        weights.unlink()
    _plant(folder / name, state, marker)


def test_anchors_from_pretrained_refuse_pickled_text_encoder_weights(
    tiny_sd: Path, tmp_path: Path, marker: Path
) -> None:
    folder = tmp_path / "sd"
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(tiny_sd / part, folder / part)
    _replace_weights_with_pickle(folder / "text_encoder", "pytorch_model.bin", marker)
    with pytest.raises(ModelNotFoundError, match=r"could not load the tokenizer and text encoder .*Weights only load"):
        TokenEmbeddings.from_pretrained(folder, ["cat"])


@pytest.mark.parametrize(
    ("part", "name"), [("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")]
)
def test_stable_diffusion_from_pretrained_refuses_pickled_weights(
    part: str, name: str, tiny_sd: Path, tmp_path: Path, marker: Path
) -> None:
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd, folder)
    _replace_weights_with_pickle(folder / part, name, marker)
    with pytest.raises(ModelNotFoundError, match=r"could not load the Stable Diffusion pipeline"):
        StableDiffusionDecoder.from_pretrained(folder, ["cat"], device="cpu", progress=False)


def test_the_tiny_model_loads_when_its_weights_are_safe(tiny_sd: Path) -> None:
    # The refusals above are about the payload, not about a folder that never loads.
    anchors = TokenEmbeddings.from_pretrained(tiny_sd, ["cat", "dog"])
    assert anchors.num_classes == 2 and torch.isfinite(anchors.vectors).all()


# ---- every loader in the library's source is safe --------------------------------------------------------------


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _keyword(call: ast.Call, name: str) -> Any:
    for keyword in call.keywords:
        if keyword.arg == name:
            return ast.literal_eval(keyword.value) if isinstance(keyword.value, ast.Constant) else "<expr>"
    return None


UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "torch.jit.load",
    "eval",
    "exec",
}


UNPICKLING_MODULES = ("dill", "joblib", "shelve", "marshal", "cloudpickle")


def _scan(source: str, where: str) -> tuple[list[str], int]:
    """Unsafe loading in ``source``, and the number of ``torch.load`` calls seen."""
    tree = ast.parse(source)
    problems: list[str] = []
    torch_loads = 0
    for name, call in _calls(tree):
        line = f"{where}:{call.lineno}: {ast.unparse(call)[:100]}"
        if name in UNSAFE_CALLS:
            problems.append(f"unsafe call {line}")
        if name.endswith("torch.load"):
            torch_loads += 1
            if _keyword(call, "weights_only") is not True:
                problems.append(f"torch.load without weights_only=True: {line}")
        if name.endswith(("np.load", "numpy.load")) and _keyword(call, "allow_pickle") not in (None, False):
            problems.append(f"np.load with allow_pickle: {line}")
        if name.endswith("from_pretrained") and _keyword(call, "trust_remote_code") not in (None, False):
            problems.append(f"trust_remote_code: {line}")
        if name.endswith("from_pretrained") and _keyword(call, "use_safetensors") is False:
            problems.append(f"use_safetensors=False: {line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in UNPICKLING_MODULES or module in ("torch.load", "pickle.load", "pickle.loads"):
                problems.append(f"imports {module}: {where}:{node.lineno}")
    return problems, torch_loads


def _library_sources() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_library_source_loads_nothing_unsafely() -> None:
    problems: list[str] = []
    torch_loads = 0
    for path in _library_sources():
        found, loads = _scan(path.read_text(), str(path.relative_to(REPO)))
        problems += found
        torch_loads += loads
    assert not problems, "\n".join(problems)
    print(f"scanned {len(_library_sources())} library files; {torch_loads} torch.load call(s), all weights_only=True")
    assert torch_loads >= 1  # the scan does see dreamood.io.load_checkpoint


def test_the_source_scan_catches_unsafe_loaders() -> None:
    source = (
        "import pickle, numpy as np, torch, yaml, joblib\n"
        "from torch import load\n"
        "torch.load('x.pt')\n"
        "torch.load('x.pt', weights_only=False)\n"
        "torch.load('x.pt', weights_only=True)\n"
        "pickle.loads(b'')\n"
        "np.load('x.npy', allow_pickle=True)\n"
        "np.load('x.npy')\n"
        "yaml.load('a: 1')\n"
        "yaml.safe_load('a: 1')\n"
        "CLIPTextModel.from_pretrained('m', trust_remote_code=True)\n"
    )
    problems, torch_loads = _scan(source, "example.py")
    assert torch_loads == 3
    assert [p.split(":")[0] for p in problems] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "unsafe call example.py",
        "np.load with allow_pickle",
        "unsafe call example.py",
        "trust_remote_code",
        "imports joblib",
        "imports torch.load",
    ], problems


# ---- class names never become paths ----------------------------------------------------------------------------


class _FlatDecoder:
    """Decodes every vector to a grey image; its class names are whatever the test gives."""

    embedding_dim = 2

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names

    def decode(self, vectors: torch.Tensor, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return torch.full((len(seeds), 3, 4, 4), 0.5)


HOSTILE_NAMES = ["../escaped", "/tmp/absolute", "a/../../b", "..", ".", "con", "x\\..\\y", "~/home", "a\x00b"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(
        st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(min_size=1, max_size=12)), min_size=2, max_size=3, unique=True
    )
)
def test_generated_images_are_named_by_class_index_whatever_the_class_names(
    names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    generate_images = pytest.importorskip("dreamood.decoding.generation").generate_images
    from dreamood.sampling.samples import EmbeddingSamples

    root = tmp_path_factory.mktemp("sandbox")
    out_dir = root / "images"
    labels = torch.arange(len(names)).repeat_interleave(2)
    generate_images(
        _FlatDecoder(names), EmbeddingSamples(torch.ones(len(labels), 2), labels), out_dir, show_progress=False
    )
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    expected = sorted(
        [f"images/{label:03d}/{index:06d}.png" for index, label in enumerate(labels.tolist())]
        + ["images/classes.json", "images/manifest.jsonl"]
    )
    assert written == expected
    assert json.loads((out_dir / "classes.json").read_text()) == names
    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [row["class_name"] for row in rows] == [names[label] for label in labels.tolist()]


def test_pipeline_generation_never_makes_a_folder_from_a_class_name(tmp_path: Path) -> None:
    pipeline = pytest.importorskip("dreamood.pipeline")
    from dreamood.config import load_config
    from dreamood.sampling.samples import EmbeddingSamples

    names = ["../../escaped", "/tmp/absolute-class"]
    out_dir = tmp_path / "run"
    config = load_config(
        "cifar100", {"output_dir": str(out_dir), "generation.images_per_class": 2, "device": "cpu", "progress": False}
    )
    images = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    data = pipeline.PipelineData(names, images, images, images, {"noise": images})
    pipe = pipeline.Pipeline(config, data, decoder_factory=lambda cfg, class_names: _FlatDecoder(class_names))
    folder = pipe.generate(EmbeddingSamples(torch.ones(4, 2), torch.tensor([0, 0, 1, 1])))
    everything = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(path.startswith("run/") for path in everything), everything
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["000", "001"]
    assert not Path("/tmp/absolute-class").exists()


def test_imagenet_links_refuse_ids_that_are_not_one_folder_name(tmp_path: Path) -> None:
    from dreamood.data.datasets import link_imagenet_subset

    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"\.\./val"):
        link_imagenet_subset(tmp_path / "imagenet", tmp_path / "subset", wnids=["n01", "../val"], splits=["train"])
    assert not (tmp_path / "subset" / "val").exists()


# ---- no network ------------------------------------------------------------------------------------------------


def test_the_test_suite_blocks_network_connections() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        with pytest.raises(RuntimeError, match="tried to open a network connection to .*93.184.216.34"):
            sock.connect(("93.184.216.34", 80))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


GUARD = """
import socket, sys
attempts = []
def refuse(self, address, *args):
    attempts.append(address)
    raise OSError(f"network connection attempted: {address!r}")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)
real_getaddrinfo = socket.getaddrinfo
def lookup(host, *args, **kwargs):
    attempts.append(host)
    raise OSError(f"name lookup attempted: {host!r}")
socket.getaddrinfo = lookup
"""

CHILD = (
    GUARD
    + """
import dreamood
for name in dreamood.__all__:
    getattr(dreamood, name)
folder = sys.argv[1]
anchors = dreamood.TokenEmbeddings.from_pretrained(folder, ["cat", "dog"])
decoder = dreamood.StableDiffusionDecoder.from_pretrained(
    folder, ["cat", "dog"], device="cpu", progress=False, num_inference_steps=1, height=32, width=32
)
images = decoder.decode(anchors.vectors, __import__("torch").tensor([0, 1]), [0, 1])
assert images.shape == (2, 3, 32, 32), images.shape
print("connections attempted:", len(attempts))
sys.exit(1 if attempts else 0)
"""
)


def test_import_and_offline_models_open_no_connection(tiny_sd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_sd)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "connections attempted: 0" in result.stdout


def test_the_subprocess_guard_does_catch_a_connection() -> None:
    probe = GUARD + "\ntry:\n    socket.create_connection(('example.com', 80))\nexcept OSError as e:\n    print(e)\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "attempted: ('example.com', 80)" in result.stdout, result.stdout + result.stderr
