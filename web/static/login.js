"use strict";
document.addEventListener("DOMContentLoaded", () => {
  window.LPMOS_I18N.apply(document);
});
