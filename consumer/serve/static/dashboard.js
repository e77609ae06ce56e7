// Small conveniences only; every page works without JavaScript.
document.addEventListener("DOMContentLoaded", () => {
  // "select all" checkboxes in table headers
  for (const all of document.querySelectorAll("[data-select-all]")) {
    all.addEventListener("change", () => {
      for (const box of all.closest("table").querySelectorAll("tbody input[type=checkbox]")) {
        box.checked = all.checked;
      }
    });
  }
  // confirmation for destructive actions
  for (const el of document.querySelectorAll("[data-confirm]")) {
    const form = el.tagName === "FORM" ? el : el.form;
    const ask = (event) => { if (!confirm(el.dataset.confirm)) event.preventDefault(); };
    if (el.tagName === "FORM") form.addEventListener("submit", ask);
    else el.addEventListener("click", ask);
  }
  // optional auto-refresh of the overview, remembered in this browser
  const toggle = document.querySelector("[data-autorefresh]");
  if (toggle) {
    const key = "smsq-autorefresh";
    toggle.checked = localStorage.getItem(key) === "on";
    let timer = null;
    const arm = () => {
      clearTimeout(timer);
      if (toggle.checked) timer = setTimeout(() => location.reload(), toggle.dataset.autorefresh * 1000);
    };
    toggle.addEventListener("change", () => { localStorage.setItem(key, toggle.checked ? "on" : "off"); arm(); });
    arm();
  }
});
