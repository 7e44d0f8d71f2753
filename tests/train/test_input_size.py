"""`--image-size auto`: the model input from the training images' aspect ratio within a pixel budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from slsg_train.data.input_size import choose_input_size, choose_input_size_for, input_size_for_aspect, parse_auto
from slsg_train.training.config import TrainConfig, parse_image_size


def test_square_images_keep_the_square_default():
    choice = choose_input_size([(900, 900), (256, 256), (1024, 1024)])
    assert choice.size == (256, 256) and choice.median_aspect == 1.0 and choice.distinct_sizes == 3


def test_a_long_strip_is_not_squashed():
    h, w = choose_input_size([(500, 1250)] * 4).size
    assert (h, w) == (160, 416)  # 2.6:1 against the images' 2.5:1; 256x256 would be 1:1
    assert h % 32 == 0 and w % 32 == 0 and abs(h * w / 256**2 - 1) < 0.05
    assert choose_input_size([(1250, 500)]).size == (416, 160)  # upright strips too


@pytest.mark.parametrize("aspect", [0.05, 0.3, 0.75, 1.0, 4 / 3, 2.0, 3.7, 40.0])
def test_sides_are_multiples_of_32_near_the_budget_and_the_ratio(aspect):
    h, w = input_size_for_aspect(aspect)
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) >= 64
    clipped = min(max(aspect, 1 / 16), 16)
    # rounding each side to 32 moves the ratio by at most half a step on each side
    assert abs(math.log(w / h) - math.log(clipped)) <= math.log((min(h, w) + 16) / min(h, w)) * 2
    assert 0.8 < h * w / 256**2 < 1.25


def test_the_median_aspect_decides_and_outliers_do_not():
    sizes = [(400, 1000)] * 5 + [(1000, 1000), (300, 3000)]  # five 2.5:1, one square, one 10:1
    assert choose_input_size(sizes).size == choose_input_size([(400, 1000)]).size


def test_auto_budget_and_parsing():
    assert parse_auto("auto") == 256 and parse_auto("AUTO:128") == 128 and parse_auto("320x256") is None
    assert choose_input_size([(500, 1250)], budget_side=96).size == (64, 160)
    assert parse_image_size("auto") == "auto" and parse_image_size("auto:128") == "auto:128"
    assert parse_image_size("320x256") == (256, 320) and parse_image_size(256) == (256, 256)
    for bad, problem in (("auto:7", "budget side"), ("auto:x", "budget side"), ("big", "expected N, WxH or auto"),
                         ("100", "multiples of 32")):
        with pytest.raises(ValueError, match=problem):
            parse_image_size(bad)
    with pytest.raises(ValueError, match="at least one training image"):
        choose_input_size([])


def test_train_config_defaults_to_auto_and_round_trips():
    assert TrainConfig().image_size == "auto"
    assert TrainConfig.from_dict(TrainConfig(image_size="auto:128").to_dict()).image_size == "auto:128"
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "image_size": [160, 416]}).image_size == (160, 416)
    assert TrainConfig(image_size=128).image_size == (128, 128)
    assert TrainConfig(image_size="96x64").image_size == (64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        TrainConfig(image_size="100x100")


def test_choice_reads_the_file_headers(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(50, 125), (40, 100), (60, 150)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.zeros((h, w), np.uint8)).save(paths[-1])
    choice = choose_input_size_for(paths)
    assert choice.size == (160, 416) and choice.images == 3 and choice.median_aspect == pytest.approx(2.5)
    assert "416x160 (WxH)" in choice.describe() and "2.50" in choice.describe()
