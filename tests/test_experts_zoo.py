"""Every experts class transformers ships, through d2prune's per-expert views
(docs/moe.md §2: "one mechanism for every experts class, read from the flags").

The classes are found, not listed: every ``transformers.models.*.modeling_*``
module whose source uses ``@use_experts_implementation`` is imported, and a
class counts when its ``__init__`` *is* the decorator's wrapper (the same code
object as on a probe class decorated here). Each is built alone from its own
config class with the sizes its ``__init__`` reads shrunk (hidden 24, expert
width 16, 4 experts), in fp32 with random weights, and checked against its
own eager forward:

* the routed forward through the views equals the class's forward;
* the views partition each expert's slice of the fused parameters (write
  through, no overlap, no gap), and the class's *own* forward multiplies them
  as d2prune names them: a view of expert ``e`` moves only the tokens routed
  to ``e``, row ``i`` of ``down_proj`` only output channel ``i``, row ``j`` of
  ``gate_proj`` / ``up_proj`` only through column ``j`` of ``down_proj``, and
  the output is affine in ``up_proj`` and not in ``gate_proj``;
* leaving ``unfused`` restores the module (forward, children, state dict).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from d2prune.io.experts import ExpertLinear, experts_layout, unfused

H, I, E, K, T = 24, 16, 4, 2, 12  # hidden, expert width (2I != H: a transposed reading shows), experts, top-k, tokens

# classes that cannot be built alone from their config (class name -> why); none in transformers 5.24
UNBUILDABLE: dict[str, str] = {}


@use_experts_implementation
class _Probe(nn.Module):
    def __init__(self, config):
        super().__init__()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states


DECORATED_INIT = _Probe.__init__.__code__  # the decorator's wrapper: shared by every class it decorates


@lru_cache(maxsize=None)
def experts_classes() -> tuple[type, ...]:
    """Every class in transformers' modeling modules whose ``__init__`` the
    experts decorator wrapped (inherited ones included)."""
    root = Path(transformers.models.__file__).parent
    for path in sorted(root.glob("*/modeling_*.py")):
        if "use_experts_implementation" in path.read_text(encoding="utf-8"):
            importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and ".modeling_" in name:
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, nn.Module)
                        and getattr(obj.__init__, "__code__", None) is DECORATED_INIT):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return tuple(found[k] for k in sorted(found))


def declared_flags(cls: type) -> dict[str, bool]:
    """The flags the decorator was given (read from its wrapper's closure, not from a built module)."""
    init = cls.__init__
    cells = dict(zip(init.__code__.co_freevars, (c.cell_contents for c in init.__closure__)))
    return {k: cells[k] for k in ("has_gate", "is_transposed", "is_concatenated", "has_bias", "has_post_expert_norm")}


class _Reads:
    """A config that records which attributes are read."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "names", [])

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


def _small(name: str, value):
    """A small value for a size ``__init__`` read (None keeps an optional size unset, e.g. a latent width)."""
    n = name.lower()
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [_small(name, v) for v in value]  # one size per kind of expert (Ernie 4.5 VL: text, vision)
    if not (value is None or (isinstance(value, int) and not isinstance(value, bool))):
        return value
    if "expert" in n:
        return K if ("per_tok" in n or "top" in n) else E
    if value is None:
        return None if "latent" in n else (H if "hidden" in n else I)
    if "hidden" in n or n == "d_model":
        return H
    if "intermediate" in n or "ffn" in n:
        return I
    return value


def _config_classes(cls: type) -> list[type]:
    """The annotated config class of ``cls.__init__``, then every config class its module sees."""
    hint = typing.get_type_hints(inspect.unwrap(cls.__init__)).get("config")
    out = [hint] if hint is not None else []
    module = sys.modules[cls.__module__]
    out += [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, transformers.PreTrainedConfig)
            and v is not transformers.PreTrainedConfig and v not in out]
    return out


def build(cls: type, seed: int = 0) -> nn.Module:
    """``cls`` alone, from the first config class it builds from (on the meta
    device) with the sizes its ``__init__`` read shrunk, with random fp32 weights."""
    if cls.__name__ in UNBUILDABLE:
        pytest.skip(f"{cls.__name__}: {UNBUILDABLE[cls.__name__]}")
    # sizes __init__ takes besides the config (Ernie 4.5 VL's intermediate_size, which its model passes)
    extra = list(inspect.signature(inspect.unwrap(cls.__init__)).parameters.values())[2:]
    sizes = {q.name: _small(q.name, q.default) for q in extra if _small(q.name, q.default) is not q.default}
    if any(q.name == "layer_idx" and q.default is inspect.Parameter.empty for q in extra):
        sizes["layer_idx"] = 0  # (BailingHybrid, Step3p7: the layer's index, which their model passes)
    errors = []
    for config_class in _config_classes(cls):
        try:
            config = config_class()
            shrunk: set[str] = set()
            while True:  # a default config may leave a size unset (None): shrink what was read, try again
                reads = _Reads(config)
                try:
                    with torch.device("meta"):
                        cls(reads, **sizes)
                    failed = None
                except (TypeError, ValueError) as e:
                    failed = e
                new = [n for n in dict.fromkeys(reads.names) if n not in shrunk]
                for name in new:
                    setattr(config, name, _small(name, getattr(config, name)))
                shrunk.update(new)
                if failed is None or not new:
                    break
            config._experts_implementation = "eager"
            module = cls(config, **sizes)
        except Exception as e:  # noqa: BLE001 - the next config class may be the right one
            errors.append(f"{config_class.__name__}: {type(e).__name__}: {e}")
            continue
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return module.float().eval()
    raise AssertionError(f"{cls.__name__} builds from none of its config classes: " + "; ".join(errors))


def routing(seed: int = 1, scale: float = 1.0):
    """Random tokens, each routed to K distinct experts of the first E - 1 (expert E - 1 gets none)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * scale
    index = torch.rand(T, E - 1, generator=g).argsort(dim=-1)[:, :K]
    weights = torch.rand(T, K, generator=g).softmax(dim=-1)
    return x, index, weights


def own(module: nn.Module, *inputs) -> torch.Tensor:
    """The class's own (dispatching, here eager) forward, whatever is installed on the instance."""
    with torch.no_grad():
        return type(module).forward(module, *inputs)


def linear_part(module: nn.Module, *inputs) -> torch.Tensor:
    """The class's own forward output, linear in each expert's ``down_proj``; with a
    post-expert norm (which is not), the norm's inputs instead, expert after expert."""
    if not module.has_post_expert_norm:
        return own(module, *inputs)
    seen = []
    hook = module.post_expert_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        own(module, *inputs)
    finally:
        hook.remove()
    return torch.cat(seen)


def views(module: nn.Module, e: int) -> dict[str, ExpertLinear]:
    return {n: m for n, m in module.get_submodule(str(e)).named_children()}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny matmuls: waking a second thread costs more than the work (x100 on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLASSES = experts_classes()
IDS = [c.__name__ for c in CLASSES]


def test_every_decorated_class_is_found():
    names = set(IDS)
    assert len(CLASSES) >= 60, IDS
    # the six families tests/test_moe.py runs whole, and one of each declared layout variant
    assert {"MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "GptOssExperts",
            "DeepseekV3Experts", "NemotronHExperts", "MuseSparkExperts", "AriaExperts"} <= names
    variants = {tuple(declared_flags(c).values()) for c in CLASSES}
    assert len(variants) >= 5  # default, no gate, post norm, transposed, transposed+interleaved+bias, ...


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_routed_forward_through_the_views_equals_the_class_forward(cls):
    m = build(cls)
    layout = experts_layout(m)
    assert layout is not None
    flags = declared_flags(cls)
    assert (layout.gated, layout.transposed, layout.concatenated, layout.bias, layout.post_norm) == (
        flags["has_gate"], flags["is_transposed"], flags["is_concatenated"], flags["has_bias"],
        flags["has_post_expert_norm"])
    assert layout.num_experts == E
    inputs = routing()
    ref = m(*inputs)
    assert ref.abs().max() > 0
    with unfused(m) as done:
        assert done == [m]
        out = m(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_views_are_the_slices_the_class_forward_multiplies(cls):
    m = build(cls)
    x, index, weights = routing()
    keys = list(m.state_dict())
    with unfused(m), torch.no_grad():
        assert list(m.state_dict()) == keys  # the views hold no parameter of their own
        layout = m._d2prune_experts.layout
        fused = {n: getattr(m, n) for n in (layout.up, layout.down)}
        owner = {n: torch.full(p.shape, -1) for n, p in fused.items()}  # which view each element belongs to
        roles = ("gate_proj", "up_proj", "down_proj") if layout.gated else ("up_proj", "down_proj")
        for e in range(E):
            v = views(m, e)
            assert tuple(v) == roles
            for r, (role, lin) in enumerate(v.items()):
                p = fused[lin.param]
                before = p.clone()
                lin.weight.add_(1.0)  # written through the view ...
                changed = p != before
                p.copy_(before)
                assert int(changed.sum()) == lin.weight.numel() and changed[e].sum() == changed.sum()
                assert (owner[lin.param][changed] == -1).all(), f"{role} of expert {e} overlaps another view"
                owner[lin.param][changed] = e * len(roles) + r
        for n, o in owner.items():  # ... and every element of the fused parameters is some view's
            assert (o >= 0).all(), f"{n} has elements no view holds"

        ref = own(m, x, index, weights)
        routed_to = [(index == e).any(dim=-1) for e in range(E)]
        for e in range(E):
            v = views(m, e)
            for lin in v.values():  # a view of expert e changes only the outputs of the tokens routed to e
                w = lin.weight.clone()
                lin.weight.mul_(1.5)
                moved = (own(m, x, index, weights) != ref).any(dim=-1)
                lin.weight.copy_(w)
                assert torch.equal(moved, routed_to[e]), (e, lin.role)
            if not routed_to[e].any():
                continue
            down = v["down_proj"].weight
            i = (e * 5) % H  # row i of down_proj: output channel i alone (of the post-expert norm's input)
            w = down[i].clone()
            before = linear_part(m, x, index, weights)
            down[i] += 1.0
            moved = (linear_part(m, x, index, weights) != before).any(dim=0)
            down[i] = w
            assert moved.nonzero().flatten().tolist() == [i], e
            j = (e * 3) % I  # row j of gate / up feeds column j of down_proj only
            col = down[:, j].clone()
            down[:, j] = 0
            cut = own(m, x, index, weights)
            for role in roles[:-1]:
                rows = v[role].weight
                w = rows[j].clone()
                rows[j] += 1.0
                assert torch.equal(own(m, x, index, weights), cut), (e, role)
                rows[j] = w
                other = (j + 1) % I
                w = rows[other].clone()
                rows[other] += 1.0
                assert not torch.equal(own(m, x, index, weights), cut), (e, role)
                rows[other] = w
            down[:, j] = col
        assert torch.equal(own(m, x, index, weights), ref)  # every probe undone

        if layout.gated:  # the class's forward is affine in what d2prune calls up, not in what it calls gate
            small = routing(scale=0.05)
            base = linear_part(m, *small)
            for e in range(E - 1):
                v = views(m, e)
                curvature = {}
                for role in ("gate_proj", "up_proj"):
                    w = v[role].weight.clone()
                    outs = []
                    for s in (0.0, 1.0, 2.0):
                        v[role].weight.copy_(w * s)
                        outs.append(linear_part(m, *small))
                    v[role].weight.copy_(w)
                    curvature[role] = float((outs[0] - 2 * outs[1] + outs[2]).abs().max()
                                            / (outs[1] - outs[0]).abs().max())
                assert curvature["up_proj"] < 1e-3 and curvature["gate_proj"] > 1e-2, (e, curvature)
            assert torch.equal(linear_part(m, *small), base)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_leaving_unfused_restores_the_module(cls):
    m = build(cls)
    inputs = routing()
    children = [n for n, _ in m.named_children()]
    state = {k: (v.data_ptr(), v.clone()) for k, v in m.state_dict().items()}
    ref = m(*inputs)
    with unfused(m):
        assert [n for n, _ in m.named_children()] == children + [str(e) for e in range(E)]
    assert "forward" not in vars(m) and "_d2prune_experts" not in vars(m)
    assert [n for n, _ in m.named_children()] == children
    after = m.state_dict()
    assert list(after) == list(state)
    for k, (ptr, value) in state.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k
    assert torch.equal(m(*inputs), ref)


# --------------------------------------------------------------------------- layouts declared but not followed
def _by_name(name: str) -> type:
    return next(c for c in CLASSES if c.__name__ == name)


NOT_FOLLOWED = {  # a change to a MixtralExperts module -> what layout_problem says
    "a tensor the views would not use": (
        lambda m: m.register_parameter("gate_up_proj_scale", nn.Parameter(torch.ones(E, 1, 1))), "gate_up_proj_scale"),
    "a buffer the views would not use": (lambda m: m.register_buffer("expert_scale", torch.ones(E)), "expert_scale"),
    "biases declared, not held": (lambda m: setattr(m, "has_bias", True), "gate_up_proj_bias"),
    "down_proj not chaining up": (
        lambda m: setattr(m, "down_proj", nn.Parameter(torch.zeros(E, H, I + 1))), "do not chain"),
    "transposed declared, [out, in] held": (lambda m: setattr(m, "is_transposed", True), "do not chain as transposed"),
}


@pytest.mark.parametrize("change", NOT_FOLLOWED, ids=list(NOT_FOLLOWED))
def test_a_layout_declared_but_not_followed_is_not_read(change):
    """The per-expert forward would ignore a tensor, or read the matrices wrongly: no views, so the
    fused tensors stay unknown and the run is refused (test below), instead of a wrong block output."""
    from d2prune.io.experts import layout_problem

    m = build(_by_name("MixtralExperts"))
    assert experts_layout(m) is not None and layout_problem(m) is None
    edit, says = NOT_FOLLOWED[change]
    edit(m)
    assert experts_layout(m) is None
    assert says in layout_problem(m)
    with unfused(m) as done:
        assert done == []


def test_experts_not_called_as_the_interface_are_not_read_even_when_decorated():
    """Llama 4's experts take the tokens already dispatched (``forward(hidden_states)``, [E*T, H]) and
    store ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``: tables that chain as a transposed
    layout. Were the class decorated, only its forward would tell it from one."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from d2prune.io.experts import layout_problem

    decorated = use_experts_implementation(is_transposed=True)(type("DecoratedLlama4TextExperts",
                                                                    (Llama4TextExperts,), {}))
    config = transformers.Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    with torch.device("meta"):
        m = decorated(config)
    assert (m.gate_up_proj.shape, m.down_proj.shape) == ((E, H, 2 * I), (E, I, H))
    assert experts_layout(m) is None
    assert "is not called as transformers' experts interface" in layout_problem(m)


def test_a_model_whose_experts_do_not_follow_their_layout_is_refused_before_pruning():
    from moe_models import tiny

    from d2prune import D2PruneError, PruneConfig, prune

    model = tiny("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.register_parameter("gate_up_proj_scale", nn.Parameter(torch.ones(4, 1, 1)))
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    refusal = (r"experts\.gate_up_proj \[4, 64, 64\] in MixtralExperts.*"
               r"MixtralExperts declares an experts layout it does not follow: it holds gate_up_proj_scale")
    with pytest.raises(D2PruneError, match=refusal):
        prune(model, PruneConfig(method="wanda", sparsity=0.5), ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
