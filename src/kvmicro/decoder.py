"""A synthetic transformer decoder with random weights, shaped like GPT-2-small, OPT-125m and
BLOOM-560m, for the decoding-budget regimes of :mod:`kvmicro.regimes`.

Nothing is downloaded: the weights are drawn from a seeded normal distribution (std 0.02, the
published models' initialisation) in numpy, so every framework runs the same numbers, and numpy
in float64 is the reference a framework's output is checked against. What makes each family what
it is, for timing, is kept: layer count, width, heads, MLP width, vocabulary (the tied output
projection over the vocabulary is a large part of a decode step), learned positions (GPT-2, OPT) or
ALiBi (BLOOM), GELU (GPT-2, BLOOM) or ReLU (OPT), BLOOM's embedding layer norm.

One decode step is: embed the last token, run every layer, project onto the vocabulary, take the
argmax (greedy decoding; the next step's input depends on it, as in a real decode loop). With the
KV cache on, a step appends its K/V at the next position of a cache preallocated for the whole
budget and attends over the filled prefix; with it off, a step recomputes the whole prefix (prompt
plus tokens so far) with a causal mask and keeps the last position.

Frameworks: numpy (the float64 reference, ``numpy:cpu``), torch (``torch:cpu``, ``torch:cuda``,
``torch:mps``) and MLX (``mlx:cpu``, ``mlx:gpu``). A missing framework or device raises
:class:`~kvmicro.errors.Unsupported` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import InvalidCase, Unsupported


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one decoder family. ``max_positions`` 0: no positional table (ALiBi)."""

    name: str
    layers: int
    heads: int
    d_model: int
    d_ff: int
    vocab: int
    max_positions: int
    activation: str          # "gelu" (tanh approximation) or "relu"
    alibi: bool = False
    embed_norm: bool = False

    def __post_init__(self) -> None:
        for field_name in ("layers", "heads", "d_model", "d_ff", "vocab"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise InvalidCase(f"[decoder] {self.name}: {field_name} {value!r} must be a "
                                  "positive integer")
        if self.d_model % self.heads:
            raise InvalidCase(f"[decoder] {self.name}: d_model {self.d_model} is not a multiple "
                              f"of heads {self.heads}")
        if self.activation not in ("gelu", "relu"):
            raise InvalidCase(f"[decoder] {self.name}: activation {self.activation!r}; expected "
                              "gelu or relu")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_ff
        embeddings = (self.vocab + self.max_positions) * self.d_model
        return self.layers * per_layer + embeddings

    def check_length(self, tokens: int) -> None:
        """Refuse a sequence longer than the learned position table."""
        if self.max_positions and tokens > self.max_positions:
            raise InvalidCase(f"[decoder] {self.name}: {tokens} tokens exceed its "
                              f"{self.max_positions} learned positions (prompt + budget)")

    def scaled(self, **changes: Any) -> ModelConfig:
        """A smaller model of the same family (tests, quick runs): e.g. ``layers=2``."""
        return replace(self, **changes)


#: the published shapes (HF configs of gpt2, facebook/opt-125m, bigscience/bloom-560m)
CONFIGS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", layers=12, heads=12, d_model=768, d_ff=3072, vocab=50257,
                        max_positions=1024, activation="gelu"),
    "opt-125m": ModelConfig("opt-125m", layers=12, heads=12, d_model=768, d_ff=3072,
                            vocab=50272, max_positions=2048, activation="relu"),
    "bloom-560m": ModelConfig("bloom-560m", layers=24, heads=16, d_model=1024, d_ff=4096,
                              vocab=250880, max_positions=0, activation="gelu", alibi=True,
                              embed_norm=True),
}


def get_config(name: str, **changes: Any) -> ModelConfig:
    """A named config, optionally scaled (``layers=2``, ``vocab=1000``, ...)."""
    if name not in CONFIGS:
        raise InvalidCase(f"unknown model {name!r}; expected one of {', '.join(CONFIGS)}")
    changes = {k: v for k, v in changes.items() if v is not None}
    return CONFIGS[name].scaled(**changes) if changes else CONFIGS[name]


def make_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random float32 weights (normal, std 0.02; layer norms at 1 + noise)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    d, f = cfg.d_model, cfg.d_ff
    w: dict[str, np.ndarray] = {"wte": normal(cfg.vocab, d)}
    if cfg.max_positions:
        w["wpe"] = normal(cfg.max_positions, d)
    norms = ["ln_f"] + (["ln_emb"] if cfg.embed_norm else [])
    for i in range(cfg.layers):
        p = f"h{i}."
        w[p + "qkv"] = normal(d, 3 * d)
        w[p + "qkv_b"] = normal(3 * d)
        w[p + "proj"] = normal(d, d)
        w[p + "proj_b"] = normal(d)
        w[p + "fc"] = normal(d, f)
        w[p + "fc_b"] = normal(f)
        w[p + "out"] = normal(f, d)
        w[p + "out_b"] = normal(d)
        norms += [p + "ln1", p + "ln2"]
    for name in norms:
        w[name + "_w"] = 1.0 + normal(d)
        w[name + "_b"] = normal(d)
    return w


def alibi_slopes(heads: int) -> np.ndarray:
    """BLOOM's per-head ALiBi slopes (geometric, with the interleaved extension for heads that
    are not a power of two)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(heads - closest)]
    return np.asarray(slopes, dtype=np.float64)


# ------------------------------------------------------------------------------- frameworks


class _Ops:
    """The few array operations the decoder needs, per framework. ``dtype`` is the compute
    dtype's name; attention softmax and layer norm statistics run in float32 (float64 in the
    reference)."""

    backend: str = ""
    dtype: str = "float32"

    def asarray(self, a: np.ndarray) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...
    def sync(self) -> None: ...
    def zeros(self, shape: tuple[int, ...]) -> Any: ...
    def argmax_last(self, logits: Any) -> Any: ...
    def tokens(self, ids: np.ndarray) -> Any: ...
    def concat(self, a: Any, b: Any) -> Any: ...
    def softmax(self, x: Any) -> Any: ...
    def layer_norm(self, x: Any, w: Any, b: Any) -> Any: ...
    def gelu(self, x: Any) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def take(self, table: Any, ids: Any) -> Any: ...
    def transpose(self, x: Any) -> Any: ...       # swap the last two axes
    def heads_first(self, x: Any) -> Any: ...     # [T, H, Dh] -> [H, T, Dh]
    def heads_last(self, x: Any) -> Any: ...      # [H, T, Dh] -> [T, H, Dh]
    def write(self, cache: Any, pos: int, value: Any) -> Any: ...   # cache[:, pos:pos+T] = value


class _NumpyOps(_Ops):
    backend = "numpy:cpu"

    def __init__(self, dtype: str = "float64") -> None:
        self.dtype = dtype
        self._np = np.dtype(dtype)

    def asarray(self, a: np.ndarray) -> Any:
        return np.asarray(a, dtype=self._np)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def sync(self) -> None:
        pass

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=self._np)

    def argmax_last(self, logits: Any) -> Any:
        return np.argmax(logits[-1:], axis=-1)

    def tokens(self, ids: np.ndarray) -> Any:
        return np.asarray(ids, dtype=np.int64)

    def concat(self, a: Any, b: Any) -> Any:
        return np.concatenate([a, b])

    def softmax(self, x: Any) -> Any:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def layer_norm(self, x: Any, w: Any, b: Any) -> Any:
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    def gelu(self, x: Any) -> Any:
        return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))

    def relu(self, x: Any) -> Any:
        return np.maximum(x, 0)

    def take(self, table: Any, ids: Any) -> Any:
        return table[ids]

    def transpose(self, x: Any) -> Any:
        return np.swapaxes(x, -1, -2)

    def heads_first(self, x: Any) -> Any:
        return np.swapaxes(x, 0, 1)

    def heads_last(self, x: Any) -> Any:
        return np.swapaxes(x, 0, 1)

    def write(self, cache: Any, pos: int, value: Any) -> Any:
        cache[:, pos:pos + value.shape[1]] = value
        return cache


class _TorchOps(_Ops):
    def __init__(self, device: str, dtype: str, threads: int | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise Unsupported(f"torch:{device} needs torch (pip install kvmicro[torch]): "
                              f"{exc}") from exc
        if device == "cuda" and not torch.cuda.is_available():
            raise Unsupported("torch:cuda: torch.cuda.is_available() is False (no CUDA device "
                              f"or a CPU-only build, torch {torch.__version__})")
        if device == "mps" and not (getattr(torch.backends, "mps", None)
                                    and torch.backends.mps.is_available()):
            raise Unsupported("torch:mps: torch.backends.mps.is_available() is False (not an "
                              "Apple GPU, or torch built without MPS)")
        self.torch = torch
        self.device = torch.device(device)
        self.backend = f"torch:{device}"
        self.dtype = dtype
        self._dt = getattr(torch, dtype)
        torch.set_grad_enabled(False)
        if threads is not None:
            torch.set_num_threads(threads)

    def asarray(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self._dt)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().to("cpu", self.torch.float64).numpy()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            self.torch.mps.synchronize()

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self._dt, device=self.device)

    def argmax_last(self, logits: Any) -> Any:
        return logits[-1:].argmax(dim=-1)

    def tokens(self, ids: np.ndarray) -> Any:
        return self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)

    def concat(self, a: Any, b: Any) -> Any:
        return self.torch.cat([a, b])

    def softmax(self, x: Any) -> Any:
        return self.torch.softmax(x.float(), dim=-1).to(self._dt)

    def layer_norm(self, x: Any, w: Any, b: Any) -> Any:
        return self.torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    def gelu(self, x: Any) -> Any:
        return self.torch.nn.functional.gelu(x, approximate="tanh")

    def relu(self, x: Any) -> Any:
        return self.torch.relu(x)

    def take(self, table: Any, ids: Any) -> Any:
        return table[ids]

    def transpose(self, x: Any) -> Any:
        return x.transpose(-1, -2)

    def heads_first(self, x: Any) -> Any:
        return x.transpose(0, 1)

    def heads_last(self, x: Any) -> Any:
        return x.transpose(0, 1)

    def write(self, cache: Any, pos: int, value: Any) -> Any:
        cache[:, pos:pos + value.shape[1]] = value
        return cache


class _MlxOps(_Ops):
    def __init__(self, device: str, dtype: str) -> None:
        try:
            import mlx.core as mx
        except ImportError as exc:
            raise Unsupported(f"mlx:{device} needs mlx (pip install kvmicro[mlx]): {exc}") from exc
        if device == "gpu":
            try:
                if not mx.metal.is_available() and not _mlx_cuda(mx):
                    raise Unsupported("mlx:gpu: this MLX build has no GPU (neither Metal nor "
                                      "CUDA is available)")
            except AttributeError as exc:
                raise Unsupported(f"mlx:gpu: cannot query MLX's GPU support ({exc})") from exc
        self.mx = mx
        self.stream_device = mx.gpu if device == "gpu" else mx.cpu
        mx.set_default_device(self.stream_device)
        self.backend = f"mlx:{device}"
        self.dtype = dtype
        self._dt = getattr(mx, dtype)

    def asarray(self, a: np.ndarray) -> Any:
        x = self.mx.array(np.ascontiguousarray(a)).astype(self._dt)
        self.mx.eval(x)
        return x

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x.astype(self.mx.float32), dtype=np.float64)

    def sync(self) -> None:
        self.mx.synchronize()

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.mx.zeros(shape, dtype=self._dt)

    def argmax_last(self, logits: Any) -> Any:
        out = self.mx.argmax(logits[-1:], axis=-1)
        self.mx.eval(out)   # MLX is lazy: evaluating the step's result is what runs it
        return out

    def tokens(self, ids: np.ndarray) -> Any:
        return self.mx.array(np.asarray(ids, dtype=np.int32))

    def concat(self, a: Any, b: Any) -> Any:
        return self.mx.concatenate([a, b])

    def softmax(self, x: Any) -> Any:
        return self.mx.softmax(x.astype(self.mx.float32), axis=-1).astype(self._dt)

    def layer_norm(self, x: Any, w: Any, b: Any) -> Any:
        return self.mx.fast.layer_norm(x, w, b, 1e-5)

    def gelu(self, x: Any) -> Any:
        return 0.5 * x * (1.0 + self.mx.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))

    def relu(self, x: Any) -> Any:
        return self.mx.maximum(x, 0)

    def take(self, table: Any, ids: Any) -> Any:
        return table[ids]

    def transpose(self, x: Any) -> Any:
        return self.mx.swapaxes(x, -1, -2)

    def heads_first(self, x: Any) -> Any:
        return self.mx.swapaxes(x, 0, 1)

    def heads_last(self, x: Any) -> Any:
        return self.mx.swapaxes(x, 0, 1)

    def write(self, cache: Any, pos: int, value: Any) -> Any:
        cache[:, pos:pos + value.shape[1]] = value
        return cache


def _mlx_cuda(mx: Any) -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


#: decoder backends, the reference first
DECODER_BACKENDS: tuple[str, ...] = ("numpy:cpu", "torch:cpu", "torch:cuda", "torch:mps",
                                     "mlx:cpu", "mlx:gpu")


def make_ops(backend: str, dtype: str | None = None, threads: int | None = None) -> _Ops:
    """The framework adapter for ``backend``; ``dtype`` defaults to float32 on CPU and float16
    on a GPU; ``threads`` sets torch's intra-op threads (torch:cpu only)."""
    if backend not in DECODER_BACKENDS:
        raise InvalidCase(f"unknown decoder backend {backend!r}; expected one of "
                          f"{', '.join(DECODER_BACKENDS)}")
    family, device = backend.split(":")
    if dtype is None:
        dtype = "float64" if family == "numpy" else "float32" if device == "cpu" else "float16"
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise InvalidCase(f"unknown dtype {dtype!r}; expected float16, bfloat16, float32")
    if threads is not None:
        if backend != "torch:cpu":
            raise Unsupported(f"threads: {backend} has no intra-op thread setting here (only "
                              "torch:cpu does)")
        if threads < 1:
            raise InvalidCase(f"threads {threads} must be >= 1")
    if family == "numpy":
        return _NumpyOps(dtype)
    if family == "torch":
        return _TorchOps(device, dtype, threads)
    return _MlxOps(device, dtype)


# ------------------------------------------------------------------------------- the model


class Decoder:
    """The model on one framework. ``start(prompt, budget, kv_cache)``, ``prefill()``, then
    ``step()`` up to ``budget - 1`` times (the prefill yields the first token); each returns
    the next token (a framework array, already computed: the call does not return before the
    step's work is dispatched and, on lazy MLX, evaluated; call ``ops.sync()`` to wait)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], ops: _Ops) -> None:
        self.cfg = cfg
        self.ops = ops
        self.w = {k: ops.asarray(v) for k, v in weights.items()}
        if cfg.alibi:
            self.slopes = alibi_slopes(cfg.heads)
        self._kv = True
        self.cache: list[tuple[Any, Any]] = []
        self.tokens: Any = None
        self.length = 0
        self.capacity = 0
        self.budget = 0
        ops.sync()

    # -- building blocks --------------------------------------------------------------------
    def _embed(self, ids: Any, start: int) -> Any:
        o, w = self.ops, self.w
        x = o.take(w["wte"], ids)
        if self.cfg.max_positions:
            x = x + w["wpe"][start:start + ids.shape[0]]
        if self.cfg.embed_norm:
            x = o.layer_norm(x, w["ln_emb_w"], w["ln_emb_b"])
        return x

    def _setup(self, capacity: int, kv_cache: bool) -> None:
        """Allocate what a run needs before it is timed: the KV cache for ``capacity`` positions
        and the attention biases (causal mask, ALiBi), sliced per step afterwards."""
        cfg, o = self.cfg, self.ops
        self._kv = kv_cache
        self.capacity = capacity
        self.cache = ([(o.zeros((cfg.heads, capacity, cfg.head_dim)),
                        o.zeros((cfg.heads, capacity, cfg.head_dim)))
                       for _ in range(cfg.layers)] if kv_cache else [])
        pos = np.arange(capacity)
        rel = pos[:, None] - pos[None, :]                         # query minus key position
        full = np.where(rel < 0, -np.inf, 0.0)[None]              # causal
        if cfg.alibi:
            full = full - self.slopes[:, None, None] * np.maximum(rel, 0)[None]
            # one query at the newest position over its prefix: -slope * distance
            self._decode_bias = o.asarray(-self.slopes[:, None, None]
                                          * (capacity - 1 - pos)[None, None, :])
        self._full_bias = o.asarray(full)
        o.sync()

    def _bias(self, q_len: int, k_len: int) -> Any:
        """Additive attention bias for the last ``q_len`` of ``k_len`` positions; None for one
        query over its prefix without ALiBi."""
        if q_len == 1:
            if not self.cfg.alibi:
                return None
            return self._decode_bias[:, :, self.capacity - k_len:]
        return self._full_bias[:, k_len - q_len:k_len, :k_len]

    def _layer(self, i: int, x: Any, start: int, bias: Any) -> Any:
        """One pre-norm block over the new positions ``x`` [T, d] starting at ``start``."""
        o, w, cfg = self.ops, self.w, self.cfg
        p = f"h{i}."
        t, hd = x.shape[0], cfg.head_dim
        h = o.layer_norm(x, w[p + "ln1_w"], w[p + "ln1_b"])
        qkv = h @ w[p + "qkv"] + w[p + "qkv_b"]
        q, k, v = (o.heads_first(qkv[:, j * cfg.d_model:(j + 1) * cfg.d_model]
                                 .reshape(t, cfg.heads, hd)) for j in range(3))
        if self._kv:
            kc, vc = self.cache[i]
            kc = o.write(kc, start, k)
            vc = o.write(vc, start, v)
            self.cache[i] = (kc, vc)
            k, v = kc[:, :start + t], vc[:, :start + t]
        scores = (q @ o.transpose(k)) * (1.0 / math.sqrt(hd))
        if bias is not None:
            scores = scores + bias
        attn = o.heads_last(o.softmax(scores) @ v).reshape(t, cfg.d_model)
        x = x + attn @ w[p + "proj"] + w[p + "proj_b"]
        h = o.layer_norm(x, w[p + "ln2_w"], w[p + "ln2_b"])
        h = h @ w[p + "fc"] + w[p + "fc_b"]
        h = o.gelu(h) if cfg.activation == "gelu" else o.relu(h)
        return x + h @ w[p + "out"] + w[p + "out_b"]

    def forward(self, ids: Any, start: int) -> Any:
        """Logits [1, vocab] of the last of the positions ``start .. start + len(ids) - 1``
        (the only one decoding needs)."""
        o, w = self.ops, self.w
        t = int(ids.shape[0])
        bias = self._bias(t, start + t)
        x = self._embed(ids, start)
        for i in range(self.cfg.layers):
            x = self._layer(i, x, start, bias)
        x = o.layer_norm(x[-1:], w["ln_f_w"], w["ln_f_b"])
        return x @ o.transpose(w["wte"])

    # -- decoding ---------------------------------------------------------------------------
    def start(self, prompt: np.ndarray, budget: int, kv_cache: bool) -> None:
        """Get ready to decode ``budget`` tokens after ``prompt`` (untimed: allocation)."""
        n = len(prompt)
        if n < 1:
            raise InvalidCase("[decoder] the prompt needs at least one token")
        if budget < 1:
            raise InvalidCase(f"[decoder] decoding budget {budget} must be >= 1")
        self.cfg.check_length(n + budget)
        self._setup(n + budget, kv_cache)
        self.budget = budget
        self._prompt = self.ops.tokens(prompt)
        self.ops.sync()

    def prefill(self) -> Any:
        """Process the prompt given to :meth:`start` (filling the cache when it is on) and
        return the first generated token."""
        o = self.ops
        n = int(self._prompt.shape[0])
        self.tokens = self._prompt
        self.length = n
        token = o.argmax_last(self.forward(self.tokens, 0))
        self.tokens = o.concat(self.tokens, token)
        return token

    def step(self) -> Any:
        """One decode step: the next token from the last one (cache on) or from the whole prefix
        (cache off)."""
        if self.length + 1 >= self.capacity:   # the prefill's token and budget - 1 steps
            raise InvalidCase(f"[decoder] step beyond the budget: all {self.budget} tokens "
                              "are generated")
        if self._kv:
            logits = self.forward(self.tokens[-1:], self.length)
        else:
            logits = self.forward(self.tokens, 0)
        token = self.ops.argmax_last(logits)
        self.tokens = self.ops.concat(self.tokens, token)
        self.length += 1
        return token

    def logits_trace(self, prompt: np.ndarray, steps: int, kv_cache: bool) -> np.ndarray:
        """Last-position logits after the prompt and after each of ``steps`` decode steps, fed
        with a fixed continuation (the prompt's tokens again) so two implementations see the
        same inputs even where their argmax would differ: for checks, not for timing."""
        o = self.ops
        n = len(prompt)
        self.cfg.check_length(n + steps)
        feed = np.resize(np.asarray(prompt), steps)
        self._setup(n + steps, kv_cache)
        out = [o.to_numpy(self.forward(o.tokens(prompt), 0))[-1]]
        tokens = np.asarray(prompt)
        for s in range(steps):
            tokens = np.concatenate([tokens, feed[s:s + 1]])
            if kv_cache:
                logits = self.forward(o.tokens(tokens[-1:]), len(tokens) - 1)
            else:
                logits = self.forward(o.tokens(tokens), 0)
            out.append(o.to_numpy(logits)[-1])
        return np.stack(out)


def random_prompt(cfg: ModelConfig, length: int, seed: int = 0) -> np.ndarray:
    if length < 1:
        raise InvalidCase(f"[decoder] prompt length {length} must be >= 1")
    return np.random.default_rng(seed + 1).integers(0, cfg.vocab, size=length, dtype=np.int64)


__all__ = ["CONFIGS", "DECODER_BACKENDS", "Decoder", "ModelConfig", "alibi_slopes", "get_config",
           "make_ops", "make_weights", "random_prompt"]
