"""Box coordinate conventions (vision_rl/coords.py): smart_resize sizes, conversions, round trips."""

import dataclasses
import itertools
import math
import random

import pytest

from vision_rl.coords import CONVENTIONS, BoxCoder, convention_for, resized_size

SIZES = [(640, 480), (333, 517), (1000, 200), (2000, 1500), (20, 10)]


# --------------------------------------------------------------------------------------------
# convention_for
# --------------------------------------------------------------------------------------------


def test_conventions_tuple():
    assert CONVENTIONS == ("relative_1000", "absolute_resized")


@pytest.mark.parametrize(
    "model_type,expected",
    [("qwen2_vl", "relative_1000"), ("qwen3_vl", "relative_1000"), ("qwen2_5_vl", "absolute_resized")],
)
def test_convention_for_known_models(model_type, expected):
    assert convention_for(model_type) == expected


@pytest.mark.parametrize("model_type", ["llava", "qwen2", "Qwen2-VL", "", None])
def test_convention_for_unknown_model_says_what_to_set(model_type):
    with pytest.raises(ValueError, match="task.box_convention") as e:
        convention_for(model_type)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# resized_size (qwen_vl_utils.smart_resize, factor 28)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width,height,expected",
    [
        # 640x480: w round(640/28 = 22.86) = 23 -> 644; h round(480/28 = 17.14) = 17 -> 476;
        # 644 * 476 = 306544 lies within [3136, 401408]: kept.
        (640, 480, (644, 476)),
        # 333x517: w round(11.89) = 12 -> 336; h round(18.46) = 18 -> 504; 336 * 504 = 169344: kept.
        (333, 517, (336, 504)),
        # 1000x200: w round(35.71) = 36 -> 1008; h round(7.14) = 7 -> 196; 1008 * 196 = 197568: kept.
        (1000, 200, (1008, 196)),
        # 2000x1500: rounded 1988 x 1512 = 3005856 > 401408, so beta = sqrt(3e6 / 401408) = 2.7338;
        # w floor(2000 / 2.7338 / 28 = 26.13) = 26 -> 728; h floor(1500 / 2.7338 / 28 = 19.60) = 19 -> 532.
        (2000, 1500, (728, 532)),
        # 20x10: rounded max(28, 28) x max(28, 0) = 28 x 28 = 784 < 3136, so beta = sqrt(3136 / 200) = 3.9598;
        # w ceil(20 * 3.9598 / 28 = 2.83) = 3 -> 84; h ceil(10 * 3.9598 / 28 = 1.41) = 2 -> 56.
        (20, 10, (84, 56)),
    ],
)
def test_resized_size_hand_computed(width, height, expected):
    assert resized_size(width, height, min_pixels=3136, max_pixels=401408) == expected


def test_resized_size_argument_order_is_width_height():
    # A tall image must come back tall: (336, 504), not (504, 336).
    rw, rh = resized_size(333, 517, 3136, 401408)
    assert rh > rw


@pytest.mark.parametrize("width,height", list(itertools.product([17, 100, 333, 640, 1920, 4000], [23, 480, 517, 1080])))
def test_resized_size_multiples_of_28_within_pixel_bounds(width, height):
    rw, rh = resized_size(width, height, min_pixels=3136, max_pixels=401408)
    assert rw % 28 == 0 and rh % 28 == 0
    assert 3136 <= rw * rh <= 401408


def test_resized_size_other_factor():
    # factor 32 (Qwen3-VL patch 16 x merge 2): 640 / 32 = 20 -> 640; 480 / 32 = 15 -> 480; 307200 fits.
    assert resized_size(640, 480, 1024, 10**6, factor=32) == (640, 480)


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 480, 3136, 401408), "width"),
        ((640, -1, 3136, 401408), "height"),
        ((640.5, 480, 3136, 401408), "width"),
        ((640, 480, 401408, 3136), "min_pixels"),
        ((640, 480, 0, 3136), "min_pixels"),
        ((10_000, 10, 3136, 401408), "10000x10"),  # aspect ratio 1000 > 200: the processor refuses it
    ],
)
def test_resized_size_errors(args, match):
    with pytest.raises(ValueError, match=match):
        resized_size(*args)


# --------------------------------------------------------------------------------------------
# BoxCoder
# --------------------------------------------------------------------------------------------


def test_relative_1000_to_model_hand_computed():
    coder = BoxCoder("relative_1000")
    # x: 64 / 640 * 1000 = 100, 320 / 640 * 1000 = 500; y: 48 / 480 * 1000 = 100, 240 / 480 * 1000 = 500
    assert coder.to_model([64, 48, 320, 240], 640, 480) == [100, 100, 500, 500]
    # the right/bottom edges (x = W, y = H) map to 1000, clipped to 999; negatives clip to 0
    assert coder.to_model([-5, 0, 640, 480], 640, 480) == [0, 0, 999, 999]
    # 333 wide: 100 / 333 * 1000 = 300.3 -> 300; 517 high: 200 / 517 * 1000 = 386.8 -> 387
    assert coder.to_model([100, 200, 100, 200], 333, 517) == [300, 387, 300, 387]


def test_absolute_resized_to_model_hand_computed():
    coder = BoxCoder("absolute_resized")  # defaults: min 3136, max 401408, factor 28
    # 640x480 -> 644x476. x: 64 * 644 / 640 = 64.4 -> 64, 320 * 644 / 640 = 322;
    # y: 48 * 476 / 480 = 47.6 -> 48, 240 * 476 / 480 = 238
    assert coder.to_model([64, 48, 320, 240], 640, 480) == [64, 48, 322, 238]
    # 2000x1500 -> 728x532: the whole lower-right quarter is [364, 266, 728, 532]
    assert coder.to_model([1000, 750, 2000, 1500], 2000, 1500) == [364, 266, 728, 532]
    # beyond the image clips to [0, rw] x [0, rh]
    assert coder.to_model([-10, -10, 5000, 5000], 640, 480) == [0, 0, 644, 476]


def test_absolute_resized_uses_the_coders_pixel_limits():
    small = BoxCoder("absolute_resized", min_pixels=3136, max_pixels=100_352)  # 128 tokens
    # 2000x1500: beta = sqrt(3e6 / 100352) = 5.4677; w floor(2000 / 5.4677 / 28 = 13.06) = 13 -> 364;
    # h floor(1500 / 5.4677 / 28 = 9.80) = 9 -> 252
    assert small.max_value(2000, 1500) == (364, 252)
    assert small.to_model([2000, 1500, 2000, 1500], 2000, 1500) == [364, 252, 364, 252]


def test_max_value():
    assert BoxCoder("relative_1000").max_value(640, 480) == (999, 999)
    assert BoxCoder("absolute_resized").max_value(640, 480) == (644, 476)


def test_to_pixels_hand_computed_clips_and_orders():
    rel = BoxCoder("relative_1000")
    # x: 900 -> 576, 100 -> 64 (reordered); y: 800 -> 384, 1200 -> 576 clipped to H = 480
    assert rel.to_pixels([900, 800, 100, 1200], 640, 480) == pytest.approx([64, 384, 576, 480])
    ab = BoxCoder("absolute_resized")
    # 640x480 -> 644x476: x 322 * 640 / 644 = 320, y 238 * 480 / 476 = 240; -3 clips to 0
    assert ab.to_pixels([-3, 0, 322, 238], 640, 480) == pytest.approx([0, 0, 320, 240])


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("width,height", SIZES)
def test_round_trip_pixels_model_pixels_within_one_unit(convention, width, height):
    coder = BoxCoder(convention)
    mx, my = coder.max_value(width, height)
    # one model unit in original pixels: W/1000 (relative_1000) or W/rw (absolute_resized)
    units = (1000, 1000) if convention == "relative_1000" else (mx, my)
    tol_x, tol_y = width / units[0], height / units[1]
    rng = random.Random(0)
    for _ in range(200):
        xs = sorted(rng.uniform(0, width) for _ in range(2))
        ys = sorted(rng.uniform(0, height) for _ in range(2))
        box = [xs[0], ys[0], xs[1], ys[1]]
        model = coder.to_model(box, width, height)
        assert all(isinstance(v, int) for v in model)
        assert 0 <= model[0] <= model[2] <= mx and 0 <= model[1] <= model[3] <= my
        back = coder.to_pixels(model, width, height)
        for got, want, tol in zip(back, box, (tol_x, tol_y, tol_x, tol_y)):
            assert abs(got - want) <= tol + 1e-9


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("width,height", SIZES)
def test_round_trip_model_pixels_model_is_exact(convention, width, height):
    coder = BoxCoder(convention)
    mx, my = coder.max_value(width, height)
    rng = random.Random(1)
    for _ in range(200):
        box = [rng.randint(0, mx), rng.randint(0, my), rng.randint(0, mx), rng.randint(0, my)]
        box = [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])]
        assert coder.to_model(coder.to_pixels(box, width, height), width, height) == box


def test_conventions_disagree_on_qwen2_5_vl_images():
    # Reading Qwen2.5-VL's absolute output as relative_1000 would misplace the box badly.
    pred = [64, 48, 322, 238]
    right = BoxCoder("absolute_resized").to_pixels(pred, 640, 480)
    wrong = BoxCoder("relative_1000").to_pixels(pred, 640, 480)
    assert right == pytest.approx([64 * 640 / 644, 48 * 480 / 476, 320, 240])
    assert max(abs(a - b) for a, b in zip(right, wrong)) > 50


def test_box_coder_errors():
    with pytest.raises(ValueError, match="relative_1000"):
        BoxCoder("relative")
    coder = BoxCoder("relative_1000")
    with pytest.raises(dataclasses.FrozenInstanceError):
        coder.convention = "absolute_resized"
    for bad in ([1, 2, 3], [1, 2, 3, 4, 5], [0, 0, math.nan, 1], [0, 0, math.inf, 1], ["a", 0, 1, 1], None):
        with pytest.raises(ValueError, match="box"):
            coder.to_model(bad, 640, 480)
        with pytest.raises(ValueError, match="box"):
            coder.to_pixels(bad, 640, 480)
    for w, h in ((0, 480), (640, 0), (640.0, 480), (True, 480)):
        with pytest.raises(ValueError, match="width|height"):
            coder.to_model([0, 0, 1, 1], w, h)
