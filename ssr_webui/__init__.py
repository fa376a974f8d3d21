"""WebUI glue of the SSR-Encoder extension (AUTOMATIC1111 stable-diffusion-webui v1.10.1).

``scripts/ssr_encoder.py`` is the thin AlwaysVisible script; everything it does lives here,
one concern per module. Modules marked (pure) import nothing from the WebUI and are tested
on their own; the others import ``modules.*`` and only run inside the WebUI (or its test
stand-in):

- ``rows`` (pure): which subject context each row of a UNet call gets (CFG layouts)
- ``request`` (pure): UI / API arguments -> a validated ``SSRRequest`` (named-field errors)
- ``model_files`` (pure): finding and recognising SSR / CLIP weight files and folders
- ``preview`` (pure): heatmap overlays of the token-to-patch attention
- ``infotext`` (pure): generation-parameter keys written and pasted back
- ``runtime``: weight caches, encoding, CLIP placement, the generation lifecycle, reporting
- ``session``: one generation's hooks while it samples (install, per-step switch, removal)
- ``settings``: the extension's WebUI settings
- ``ui``: the Gradio accordion
- ``routes``: the ``/ssr/*`` HTTP routes
"""

EXTENSION_TITLE = "SSR-Encoder"
