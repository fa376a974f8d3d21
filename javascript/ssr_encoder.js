// SSR-Encoder accordion: tooltips, and keeping the mask sketch canvases usable.
(function () {
    const TIPS = {
        model: "SSR-Encoder weights found in models/ssr_encoder (our .safetensors, or the pytorch_model.bin + pytorch_model_1.bin pair).",
        clip_model: "OpenAI CLIP ViT-L/14 vision weights (models/ssr_encoder, models/clip_vision, or ControlNet's clip_vitl.pth).",
        refresh: "Look for weight files again.",
        scale: "Strength of the subject branch (lambda). 0.65 for text queries, about 0.5 for masks, 0.7 with ControlNet.",
        start: "Fraction of the sampling steps at which the subject starts to act.",
        end: "Fraction of the sampling steps at which the subject stops acting.",
        query: "Which part of the image to take, as text (e.g. 'the dog'). With a mask drawn it may stay empty.",
        weight: "How strongly this subject contributes relative to the others (1 = as trained; 0 = removed, as if the slot were empty).",
        mask_weight: "How strictly a drawn mask restricts the selection (5 = default; 1 = soft, with a text query).",
        image: "Reference image. Draw over the subject with the brush to select it by mask; leave it undrawn to select by the query text.",
        preview_button: "Show, for each slot, which image patches the query selects, before generating.",
    };

    function resizeSoon() {
        // gradio 3 sizes a sketch canvas when it is drawn; one created inside a closed accordion
        // or a hidden tab stays 0 px wide until the window is resized.
        setTimeout(function () { window.dispatchEvent(new Event("resize")); }, 80);
    }

    onUiLoaded(function () {
        for (const tab of ["txt2img", "img2img"]) {
            const prefix = "script_" + tab + "_ssrencoder_";
            for (const [key, tip] of Object.entries(TIPS)) {
                const selector = '[id="' + prefix + key + '"], [id^="' + prefix + key + '_"]';
                gradioApp().querySelectorAll(selector).forEach(function (el) { el.title = tip; });
            }
            const accordion = gradioApp().getElementById(prefix + "enabled");
            if (accordion) accordion.addEventListener("click", resizeSoon);
            const slots = gradioApp().getElementById(prefix + "slots");
            if (slots) slots.addEventListener("click", function (e) { if (e.target.closest("button")) resizeSoon(); });
        }
    });
})();
