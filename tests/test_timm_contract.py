"""The parts of timm's model contract that go beyond eager PyTorch: timm's module name, symbolic tracing with
torch.fx (timm's and torchvision's feature extraction), and TorchScript."""

from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fcaformer.fast import fuse_model
from fcaformer.models import MODEL_NAMES, PAPER_MODELS, SMALL_MODELS

# The plain model, a paper hybrid and a small hybrid (L2-L4 and femto are L1 / atto with other sizes; timm's own
# suite, ../shared/peer-tests/run_timm_suite.sh, runs every registered model).
CONTRACT_MODELS = ["fcaformer_l0", "fcaformer_l1", "fcaformer_atto"]
# Not the native grid of any of them: the grid-sized parameters are resized inside the traced / scripted graph.
SIZE = (64, 80)
TIMM_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


@pytest.fixture(autouse=True)
def _quiet_torchscript_deprecation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        yield


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **kwargs).eval()


def test_every_model_is_registered_under_timms_module_name_fcaformer() -> None:
    assert sorted(timm.list_models(module="fcaformer")) == sorted(MODEL_NAMES)
    assert set(PAPER_MODELS) == {f"fcaformer_l{i}" for i in range(5)}
    assert set(SMALL_MODELS) == {"fcaformer_atto", "fcaformer_femto"}
    for name in MODEL_NAMES:
        assert timm.models.get_pretrained_cfg(name) is not None, name


@pytest.mark.parametrize("name", CONTRACT_MODELS)
def test_symbolic_trace_matches_eager_at_every_size(name: str) -> None:
    model = _model(name)
    graph = torch.fx.symbolic_trace(model)
    native = model.pretrained_cfg["input_size"][1:]
    with torch.no_grad():
        for size in (SIZE, native):  # one graph: the size-dependent choices are made when it runs
            x = torch.randn(2, 3, *size)
            assert torch.equal(graph(x), model(x)), size


@pytest.mark.parametrize("name", ["fcaformer_l0", "fcaformer_l1"])
def test_traced_graph_keeps_the_input_checks(name: str) -> None:
    model = _model(name)
    graph = torch.fx.symbolic_trace(model)
    for bad in (torch.randn(3, 64, 64), torch.randint(0, 255, (1, 3, 64, 64)), torch.randn(1, 4, 64, 64),
                torch.randn(1, 3, 31, 64)):
        with pytest.raises(ValueError) as eager:
            model(bad)
        with pytest.raises(ValueError) as traced:
            graph(bad)
        assert str(traced.value) == str(eager.value)


def test_traced_graph_trains_like_the_model() -> None:
    model = _model("fcaformer_atto", drop_path_rate=0.0).train()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, *SIZE)
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    graph(x).square().mean().backward()
    for n, p in graph.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], msg=n)


@pytest.mark.parametrize("name", CONTRACT_MODELS)
def test_timm_fx_feature_extraction_matches_forward_intermediates(name: str) -> None:
    torch.manual_seed(0)
    fx = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)  # the same weights: both wrap a model built from the same seed
    getter = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        traced, maps = fx(x), getter(x)
    assert fx.feature_info.channels() == getter.feature_info.channels()
    assert len(traced) == len(maps)
    for tokens_or_map, feature_map in zip(traced, maps):
        if tokens_or_map.ndim == 3:  # L0: the blocks' token sequences, class token first
            patches = tokens_or_map[:, 1:].transpose(1, 2).reshape(feature_map.shape)
            assert torch.equal(patches, feature_map)
        else:
            assert torch.equal(tokens_or_map, feature_map)


@pytest.mark.parametrize(("name", "node"), [("fcaformer_l0", "blocks.blocks.5"), ("fcaformer_l1", "stages.2")])
def test_torchvision_feature_extractor_without_timm_tracer_settings(name: str, node: str) -> None:
    model = _model(name)
    train_nodes, eval_nodes = get_graph_node_names(model)  # torchvision's own tracer: no timm leaf lists
    for nodes in (train_nodes, eval_nodes):  # a module name selects the last node inside it
        assert any(n.startswith(f"{node}.") for n in nodes) and "head.fc" in nodes
    extractor = create_feature_extractor(model, return_nodes={node: "feature", "head.fc": "logits"})
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out = extractor(x)
        assert torch.equal(out["logits"], model(x))
        index = int(node.rsplit(".", 1)[1])
        _, intermediates = model.forward_intermediates(x, indices=[index], output_fmt="NLC" if name == "fcaformer_l0"
                                                       else "NCHW")
    feature = out["feature"][:, 1:] if name == "fcaformer_l0" else out["feature"]
    assert torch.equal(feature, intermediates[0])


def _script_round_trip(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """Script, save and load back: a scripted model must be a deployable artifact, not a Python-backed one."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("name", CONTRACT_MODELS)
def test_torchscript_matches_eager(name: str) -> None:
    model = _model(name)
    scripted = _script_round_trip(model)
    with torch.no_grad():
        for size in (SIZE, model.pretrained_cfg["input_size"][1:]):
            x = torch.randn(2, 3, *size)
            assert torch.equal(scripted(x), model(x)), size


@pytest.mark.parametrize("kwargs", [dict(window_size=(14, 7)), dict(fused=True)])
def test_torchscript_windowed_and_fast_path(kwargs: dict) -> None:
    fused = kwargs.pop("fused", False)
    model = _model("fcaformer_atto", **kwargs)
    if fused:
        model = fuse_model(model)
    scripted = _script_round_trip(model)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)


def test_scripted_fx_feature_extractor() -> None:
    model = _model("fcaformer_l1")
    extractor = create_feature_extractor(model, return_nodes=["stages.3", "head.fc"], tracer_kwargs=TIMM_TRACER)
    scripted = torch.jit.script(extractor)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(scripted(x)["head.fc"], model(x))
