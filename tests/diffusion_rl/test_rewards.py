"""Image rewards (diffusion_rl/rewards.py): hand-computed values, reference computations on tiny models."""

import io
import json
import math
import shutil
import string

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_rl import rewards as R
from shared.config import RewardSpec
from shared.rewards import REWARDS, CombinedReward

RED = [255, 0, 0]


def flat(rgb, size=(4, 4)):
    return Image.new("RGB", size, tuple(rgb))


def noise(seed, size=(48, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_registered_names():
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "color_area", "aesthetic", "clip_score", "python_reward"):
        assert REWARDS[name] is getattr(R, name)


# ------------------------------------------------------------------------------------------------
# JPEG compressibility
# ------------------------------------------------------------------------------------------------


def _pil_kb(image, quality):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def test_jpeg_flat_is_more_compressible_than_noise_and_exact_size():
    flat_im, noise_im = flat((90, 140, 200), (64, 64)), noise(0, (64, 64))
    assert R.jpeg_kb(flat_im, 95) < R.jpeg_kb(noise_im, 95)
    scores = R.jpeg_compressibility()([flat_im, noise_im])
    assert scores == [-_pil_kb(flat_im, 95), -_pil_kb(noise_im, 95)]
    assert scores[0] > scores[1]
    assert R.jpeg_incompressibility()([flat_im, noise_im]) == [-s for s in scores]


def test_jpeg_quality_is_used_and_validated():
    im = noise(1, (64, 64))
    assert R.jpeg_compressibility(quality=10)([im]) == [-_pil_kb(im, 10)]
    assert R.jpeg_kb(im, 10) < R.jpeg_kb(im, 95)
    for bad in (0, 101, 9.5, True):
        with pytest.raises(ValueError, match="quality"):
            R.jpeg_compressibility(quality=bad)


def test_jpeg_non_image_is_none():
    assert R.jpeg_incompressibility()(["not an image", flat(RED)])[0] is None


# ------------------------------------------------------------------------------------------------
# color_area
# ------------------------------------------------------------------------------------------------


def test_color_distance_extremes():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    np.testing.assert_allclose(R.color_distance(px, [0, 0, 0]), [[0.0, 1.0, 1 / math.sqrt(3)]])


def test_color_area_counts_exact_fraction():
    px = np.zeros((4, 4, 3), dtype=np.uint8)
    px[..., 2] = 255  # blue, distance sqrt(2)/sqrt(3) ~ 0.816 from red
    for r, c in [(0, 0), (0, 3), (1, 1), (2, 2), (3, 0)]:
        px[r, c] = RED
    assert R.color_fraction(px, RED, 0.25) == 5 / 16
    assert R.color_area()([Image.fromarray(px)], rgb=[RED]) == [5 / 16]
    assert R.color_area(threshold=0.9)([Image.fromarray(px)], rgb=[RED]) == [1.0]


def test_color_area_threshold_boundary():
    # pixel (255, 0, b) vs red: distance = sqrt((b/255)^2) / sqrt(3) = b / (255 sqrt 3)
    below, above = 110 / (255 * math.sqrt(3)), 111 / (255 * math.sqrt(3))
    assert below < 0.25 < above  # 0.24904..., 0.25131...
    reward = R.color_area(field="target", threshold=0.25)
    assert reward([flat((255, 0, 110), (1, 1)), flat((255, 0, 111), (1, 1))], target=[RED, RED]) == [1.0, 0.0]
    assert R.color_area(threshold=above)([flat((255, 0, 111), (1, 1))], rgb=[RED]) == [1.0]


def test_color_area_accepts_tuples_and_floats_non_image_is_none():
    assert R.color_area()([flat(RED), "text"], rgb=[(255.0, 0, 0), RED]) == [1.0, None]


BAD_TARGETS = [[255, 0], [0, 0, 256], [-1, 0, 0], "red", [1, 2, "3"], [True, 0, 0], [float("nan"), 0, 0], None]


@pytest.mark.parametrize("bad", BAD_TARGETS)
def test_color_area_malformed_target_raises(bad):
    with pytest.raises(ValueError, match="color_area: field 'rgb'") as e:
        R.color_area()([flat(RED)], rgb=[bad])
    assert "\n" not in str(e.value)


def test_color_area_malformed_target_is_one_failure_in_combined_reward():
    combined = CombinedReward.from_specs([RewardSpec(name="color_area", failure_value=-1.0, kwargs={"threshold": 0.25})])
    res = combined([flat(RED), flat(RED)], {"rgb": [RED, [300, 0, 0]]})
    assert res.components["color_area"].tolist() == [1.0, -1.0]
    assert res.failures == {"color_area": 1}


def test_color_area_bad_threshold_and_missing_field():
    with pytest.raises(ValueError, match="threshold"):
        R.color_area(threshold=-0.1)
    with pytest.raises(ValueError, match="color_area: needs the dataset field 'rgb'"):
        R.color_area()([flat(RED)], color=["red"])


# ------------------------------------------------------------------------------------------------
# Tiny CLIP models built in-process
# ------------------------------------------------------------------------------------------------

TOKENS = {"<|startoftext|>": 0, "<|endoftext|>": 1}
TOKENS.update({c: len(TOKENS) + i for i, c in enumerate(string.ascii_lowercase)})
TOKENS.update({c + "</w>": len(TOKENS) + i for i, c in enumerate(string.ascii_lowercase)})


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    text = dict(small, vocab_size=len(TOKENS), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    return CLIPModel(config).eval()


def save_tiny_clip(d):
    """A tiny CLIPModel with an image processor and a hand-written BPE tokenizer, saved to folder d."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    _tiny_clip().save_pretrained(d)
    (d / "vocab.json").write_text(json.dumps(TOKENS))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _image_embeds(model, images, folder):
    """Reference: vision tower -> pooled -> visual projection -> L2 normalisation."""
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return e / e.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# aesthetic
# ------------------------------------------------------------------------------------------------

HEAD = [(0, 16, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]  # (layer index, in, out)


@pytest.fixture(scope="module")
def head_state():
    g = torch.Generator().manual_seed(1)
    state = {}
    for i, n_in, n_out in HEAD:
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def _aesthetic_reference(clip_dir, head_state, images):
    from transformers import CLIPModel

    x = _image_embeds(CLIPModel.from_pretrained(clip_dir).eval(), images, clip_dir)
    for i, _, _ in HEAD:
        x = x @ head_state[f"layers.{i}.weight"].T + head_state[f"layers.{i}.bias"]
    return x.squeeze(-1).tolist()


def test_aesthetic_matches_reference(clip_dir, head_state, tmp_path):
    torch.save(head_state, tmp_path / "head.pth")
    images = [noise(2), flat((200, 30, 60), (40, 40))]
    scores = R.aesthetic(clip_path=str(clip_dir), head_path=str(tmp_path / "head.pth"))(images)
    ref = _aesthetic_reference(clip_dir, head_state, images)
    assert scores == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert scores[0] != pytest.approx(scores[1])


def test_aesthetic_safetensors_non_image_and_cached_models(clip_dir, head_state, tmp_path):
    from safetensors.torch import save_file

    save_file(head_state, tmp_path / "head.safetensors")
    local = tmp_path / "clip"
    shutil.copytree(clip_dir, local)
    reward = R.aesthetic(clip_path=str(local), head_path=str(tmp_path / "head.safetensors"))
    images = [noise(3), "text"]
    first = reward(images)
    assert first[1] is None
    assert first[0] == pytest.approx(_aesthetic_reference(clip_dir, head_state, images[:1])[0], rel=1e-5)
    shutil.rmtree(local)  # loaded once, on the first call
    assert reward(images) == first


def test_aesthetic_missing_or_wrong_files_name_the_path(clip_dir, head_state, tmp_path):
    missing = tmp_path / "no_such_clip"
    reward = R.aesthetic(clip_path=str(missing), head_path=str(tmp_path / "head.pth"))  # lazy: no error yet
    for _ in range(2):  # the load error is kept, not retried
        with pytest.raises(ValueError, match="no_such_clip") as e:
            reward([noise(4)])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="aesthetic: cannot load the MLP head from .*nohead.pth"):
        R.aesthetic(clip_path=str(clip_dir), head_path=str(tmp_path / "nohead.pth"))([noise(4)])
    wrong = {k: v for k, v in head_state.items() if not k.startswith("layers.7")}
    torch.save(wrong, tmp_path / "wrong.pth")  # a missing layer
    with pytest.raises(ValueError, match="wrong.pth"):
        R.aesthetic(clip_path=str(clip_dir), head_path=str(tmp_path / "wrong.pth"))([noise(4)])


# ------------------------------------------------------------------------------------------------
# clip_score
# ------------------------------------------------------------------------------------------------


def _clip_score_reference(folder, images, prompts, scale):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    v = _image_embeds(model, images, folder)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([CLIPTokenizer.from_pretrained(folder)(p)["input_ids"]])
        assert ids[0, 0] == 0 and ids[0, -1] == 1  # <|startoftext|> ... <|endoftext|>
        with torch.no_grad():
            t = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            out.append(scale * model.logit_scale.exp().item() * float(t @ v[i]) / t.norm().item())
    return out


def test_clip_score_matches_reference(clip_dir):
    images = [noise(5), noise(6)]
    prompts = ["a red cat", "dog"]  # different lengths: the batch is padded
    scores = R.clip_score(model_path=str(clip_dir), scale=2.0)(images, prompt=prompts)
    assert scores == pytest.approx(_clip_score_reference(clip_dir, images, prompts, 2.0), rel=1e-4, abs=1e-5)


def test_clip_score_depends_on_prompt(clip_dir):
    reward = R.clip_score(model_path=str(clip_dir))
    im = noise(7)
    a, b = reward([im, im], prompt=["a red cat", "blue dog on grass"])
    assert a != pytest.approx(b, abs=1e-4)
    assert reward([im, "text"], prompt=["a red cat", "x"]) == [pytest.approx(a, rel=1e-5), None]


def test_clip_score_errors(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="clip_score: cannot load CLIP from .*nothing_here"):
        R.clip_score(model_path=str(tmp_path / "nothing_here"))([noise(8)], prompt=["a"])
    with pytest.raises(ValueError, match="needs the dataset field 'prompt'"):
        R.clip_score(model_path=str(clip_dir))([noise(8)], color=["red"])


# ------------------------------------------------------------------------------------------------
# python_reward
# ------------------------------------------------------------------------------------------------

PLUGIN = '''
def const_factory(value=1.0):
    return lambda completions, **fields: [value] * len(completions)

class Holder:
    @staticmethod
    def size():
        return lambda completions, **fields: [float(c.size[0]) for c in completions]

NOT_CALLABLE = 3

def returns_number():
    return 3
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "rlft_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "rlft_test_broken.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rlft_test_plugin"
    for name in ("rlft_test_plugin", "rlft_test_broken"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)


def test_python_reward_imports_the_factory(plugin):
    assert R.python_reward(f"{plugin}:const_factory", value=0.5)([flat(RED)] * 3) == [0.5] * 3
    assert R.python_reward(f"{plugin}:Holder.size")([flat(RED, (7, 2))]) == [7.0]
    combined = CombinedReward.from_specs(
        [RewardSpec(name="python_reward", weight=2.0, kwargs={"target": f"{plugin}:const_factory", "value": 0.25})]
    )
    assert combined([flat(RED)] * 2, {}).total.tolist() == [0.5, 0.5]


@pytest.mark.parametrize(
    "target", ["no_colon", ":const_factory", "rlft_test_plugin:", "rlft_no_such_module_xyz:f", "rlft_test_plugin:missing",
               "rlft_test_plugin:NOT_CALLABLE", "rlft_test_broken:f"],
)
def test_python_reward_bad_target(plugin, target):
    with pytest.raises(ValueError, match=f"python_reward: cannot import '{target}': ") as e:
        R.python_reward(target)
    assert "\n" not in str(e.value)


def test_python_reward_bad_factory_result_and_kwargs(plugin):
    with pytest.raises(ValueError, match="returned int, not a reward function"):
        R.python_reward(f"{plugin}:returns_number")
    spec = RewardSpec(name="python_reward", kwargs={"target": f"{plugin}:const_factory", "nope": 1})
    with pytest.raises(ValueError, match="bad kwargs"):
        CombinedReward.from_specs([spec])
