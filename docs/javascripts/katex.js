// Render the maths that pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \] spans, with the
// KaTeX copy shipped in the site (no network). Material's document$ re-runs it after instant navigation.
function renderMaths(root) {
  renderMathInElement(root, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => renderMaths(body));
} else {
  document.addEventListener("DOMContentLoaded", () => renderMaths(document.body));
}
