"""The numbers of Qwen2.5-VL's image pipeline, defined once and imported everywhere (notebook 02
teaches them; 04–07 cut and merge the patches they describe).

An image is cut into ``PATCH_SIZE`` × ``PATCH_SIZE`` patches and each ``MERGE_SIZE`` × ``MERGE_SIZE``
block of patches becomes one visual token, so a visual token covers ``FACTOR`` × ``FACTOR`` =
``TOKEN_PIXELS`` pixels and both sides of a resized image are multiples of ``FACTOR``. The pixel
limits are the checkpoint's ``preprocessor_config.json`` (also ``qwen_vl_utils``' defaults):
4 to 16,384 visual tokens per image. tests/test_constants.py checks each against the libraries.
"""

#: Side of one vision patch in pixels (``vision_config.patch_size``).
PATCH_SIZE = 14
#: Patches merged per side into one visual token (``vision_config.spatial_merge_size``).
MERGE_SIZE = 2
#: Frames stacked into one patch (``vision_config.temporal_patch_size``); a still image is repeated.
TEMPORAL_PATCH_SIZE = 2
#: Side of one visual token in pixels: what ``smart_resize`` rounds each side to.
FACTOR = PATCH_SIZE * MERGE_SIZE
#: Pixels per visual token: a budget in tokens × this = a pixel limit.
TOKEN_PIXELS = FACTOR * FACTOR
#: The checkpoint's image limits in pixels: 4 and 16,384 visual tokens.
MIN_PIXELS = 4 * TOKEN_PIXELS
MAX_PIXELS = 16384 * TOKEN_PIXELS
#: Longest side / shortest side above which both resize implementations refuse an image.
MAX_RATIO = 200
