"""The trainer's CLIP view is what CLIPImageProcessor (openai/clip-vit-large-patch14's
preprocessor_config) gives for the same image: the geometry inference uses, so the aligner is
trained on the pixels it later sees. Tolerance 1e-6: float32 rounding of rescale/normalise."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from trainer.samples import SampleTransform

Processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
REFERENCE = Processor(
    do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC,
    do_center_crop=True, crop_size={"height": 224, "width": 224},
    do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)


@pytest.mark.parametrize("size", [(1024, 683), (683, 1024), (303, 224), (224, 224)])
@pytest.mark.parametrize("flip", [False, True])
def test_clip_view_is_clip_image_processor_output(size, flip):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    transform = SampleTransform(resolution=64, clip_resolution=224, flip_prob=float(flip), prompt_dropout=0.0,
                                subject_dropout=0.0)
    sample = transform(image, "a caption", "a query", np.random.default_rng(0))
    expected = torch.from_numpy(np.asarray(REFERENCE(images=[image], return_tensors="np")["pixel_values"][0]))
    if flip:
        expected = expected.flip(-1)
    assert (sample["clip_pixel_values"] - expected).abs().max().item() <= 1e-6
