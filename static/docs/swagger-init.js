// Starts Swagger UI on /docs. A file, not an inline script, so the page runs under script-src 'self'.
// The document's URL comes from the page (data-openapi-url); nothing is loaded from another origin.
"use strict";

(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    domNode: root,
    deepLinking: true,
    // No badge image from validator.swagger.io: the page talks to this origin only.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
})();
