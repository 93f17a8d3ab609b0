// llmlab study site: a cell whose source JupyterLab shows collapsed (metadata jupyter.source_hidden,
// tagged llmlab-source-hidden by build_site.py) starts collapsed here too: its input goes inside a
// closed <details> element the reader opens with a click; its output stays visible.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".celltag_llmlab-source-hidden").forEach(function (cell) {
    const input = cell.querySelector(".jp-Cell-inputWrapper");
    if (!input || input.parentElement.tagName === "DETAILS") { return; }
    const details = document.createElement("details");
    details.className = "llmlab-solution";
    const summary = document.createElement("summary");
    summary.textContent = "Solution (click to show)";
    details.appendChild(summary);
    input.parentNode.insertBefore(details, input);
    details.appendChild(input);
  });
});
