"""Layers whose mask is all ones are not touched by mask application (no pass over their tensors),
and a layer stops being skipped as soon as its mask loses a weight and the counts are refreshed."""

import torch

from sparse_sup.core.masks import MaskState
from sparse_sup.core.targets import whole_tensor_target


def _targets():
    torch.manual_seed(0)
    dense, sparse = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, 2))
    opt = torch.optim.SGD([dense, sparse], lr=0.1, momentum=0.9)
    (dense.sum() + sparse.sum()).backward()
    opt.step()  # momentum buffers exist
    targets = [whole_tensor_target("dense", dense, opt), whole_tensor_target("sparse", sparse, opt)]
    masks = {"dense": torch.ones(4, 3, dtype=torch.bool), "sparse": torch.rand(5, 2) > 0.5}
    return targets, MaskState(masks)


def test_full_masks_are_skipped_and_partial_ones_applied():
    targets, state = _targets()
    dense, sparse = targets
    dense.grad().fill_(float("nan"))  # a skipped layer keeps exactly what it had
    sparse.grad().fill_(1.0)
    before = dense.param.clone()
    state.apply_to_grads(targets)
    state.apply(targets)
    assert torch.isnan(dense.grad()).all() and torch.equal(dense.param, before)
    keep = state.masks["sparse"]
    assert (sparse.grad()[~keep] == 0).all() and (sparse.grad()[keep] == 1).all()
    assert (sparse.param[~keep] == 0).all() and (sparse.optimizer_states()[0][~keep] == 0).all()


def test_a_layer_that_loses_a_weight_is_masked_after_recount():
    targets, state = _targets()
    dense = targets[0]
    state.masks["dense"][0, 0] = False
    state.recount()
    dense.grad().fill_(1.0)
    state.apply_to_grads(targets)
    state.apply(targets)
    assert dense.grad()[0, 0] == 0 and dense.param[0, 0] == 0 and dense.optimizer_states()[0][0, 0] == 0
    assert (dense.grad().flatten()[1:] == 1).all()
