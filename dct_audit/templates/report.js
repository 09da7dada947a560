// dct-audit report: sortable tables and a name filter. Plain JavaScript, nothing fetched.
"use strict";

// Cells sort by their data-sort value (numbers as numbers); empty values always go last.
function sortTable(table, th, column) {
  const numeric = th.dataset.type === "num";
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  for (const other of th.parentNode.cells) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const key = (row) => {
    const cell = row.cells[column];
    const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
    if (raw === "") return null;
    return numeric ? Number(raw) : raw.toLowerCase();
  };
  const body = table.tBodies[0];
  const rows = Array.from(body.rows, (row) => [key(row), row]);
  rows.sort(([a], [b]) => {
    if (a === null || b === null) return (a === null) - (b === null);
    const order = numeric ? a - b : a.localeCompare(b);
    return ascending ? order : -order;
  });
  body.append(...rows.map(([, row]) => row));
}

for (const table of document.querySelectorAll("table.sortable")) {
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
    const button = th.querySelector("button");
    if (button) button.addEventListener("click", () => sortTable(table, th, column));
  });
}

// Show only the rows whose class name contains the typed text.
for (const input of document.querySelectorAll("input.filter")) {
  const table = document.getElementById(input.dataset.table);
  input.addEventListener("input", () => {
    const text = input.value.trim().toLowerCase();
    for (const row of table.tBodies[0].rows) {
      row.hidden = text !== "" && !row.cells[1].textContent.toLowerCase().includes(text);
    }
  });
}
