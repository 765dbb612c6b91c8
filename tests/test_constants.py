"""helpers.constants: each number equals the one the libraries and the checkpoint use."""

import qwen_vl_utils.vision_process as qvu

from helpers import constants as C
from helpers.qwen import CHECKPOINT_PREPROCESSOR_CONFIG, load_processor, qwen25vl_3b_config


def test_pixel_limits_are_qwen_vl_utils_defaults():
    assert C.MIN_PIXELS == qvu.IMAGE_MIN_TOKEN_NUM * C.TOKEN_PIXELS
    assert C.MAX_PIXELS == qvu.IMAGE_MAX_TOKEN_NUM * C.TOKEN_PIXELS
    assert (C.MAX_RATIO, C.MERGE_SIZE) == (qvu.MAX_RATIO, qvu.SPATIAL_MERGE_SIZE)


def test_patch_geometry_is_the_3b_vision_config():
    vision = qwen25vl_3b_config().vision_config
    assert (C.PATCH_SIZE, C.MERGE_SIZE, C.TEMPORAL_PATCH_SIZE) == (
        vision.patch_size,
        vision.spatial_merge_size,
        vision.temporal_patch_size,
    )


def test_the_course_processor_uses_them():
    image = load_processor().image_processor
    assert (image.size["shortest_edge"], image.size["longest_edge"]) == (C.MIN_PIXELS, C.MAX_PIXELS)
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (
        C.PATCH_SIZE,
        C.MERGE_SIZE,
        C.TEMPORAL_PATCH_SIZE,
    )
    assert CHECKPOINT_PREPROCESSOR_CONFIG["min_pixels"] == image.size["shortest_edge"]
