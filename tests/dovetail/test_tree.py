"""Tree structure, greedy acceptance, and tree-masked verification against serial references."""
import itertools

import pytest
import torch

from effrun.techniques.dovetail.decoding import TargetSide
from effrun.techniques.dovetail.draft import DraftHead
from effrun.techniques.dovetail.tree import (DraftSession, Tree, additive_mask, cache_len, greedy_accept,
                                             select_tree, tree_mask)


def ancestors(parents, i):
    out = {i}
    while i:
        i = parents[i - 1]
        out.add(i)
    return out


def random_tree(n, seed, vocab=64):
    g = torch.Generator().manual_seed(seed)
    parents = [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n + 1)]
    depth = [0]
    for p in parents:
        depth.append(depth[p] + 1)
    # siblings get distinct tokens (a real draft expands top-k: distinct children)
    tokens, used = [], {}
    for p in parents:
        while True:
            t = int(torch.randint(0, vocab, (1,), generator=g))
            if t not in used.setdefault(p, set()):
                used[p].add(t)
                tokens.append(t)
                break
    par = torch.tensor(parents)
    return Tree(torch.tensor(tokens), par, torch.tensor(depth[1:]), tree_mask(par))


@pytest.mark.parametrize("seed", range(4))
def test_tree_mask_is_ancestor_or_self(seed):
    tree = random_tree(12, seed)
    par = tree.parents.tolist()
    for i, j in itertools.product(range(13), range(13)):
        assert bool(tree.mask[i, j]) == (j in ancestors(par, i))


def test_select_tree_top_scores_closed_under_ancestors():
    # level-ordered candidates: 3 at depth 1, then children; scores are cumulative log-probs
    tokens = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    parents = torch.tensor([-1, -1, -1, 0, 0, 1, 3])
    levels = torch.tensor([1, 1, 1, 2, 2, 2, 3])
    scores = torch.tensor([-0.1, -1.0, -3.0, -0.2, -2.5, -1.1, -0.2])  # node 6 ties its parent 3
    t = select_tree(tokens, scores, parents, levels, 4)
    assert t.tokens.tolist() == [5, 6, 8, 11]          # best 4 (ties: shallower first), in level order
    assert t.parents.tolist() == [0, 0, 1, 3]
    assert t.depths.tolist() == [1, 1, 2, 3]
    for n in range(1, 8):
        t = select_tree(tokens, scores, parents, levels, n)
        assert t.size == n
        for i, p in enumerate(t.parents.tolist(), start=1):
            assert 0 <= p < i


def test_greedy_accept_walks_matching_children():
    #      root
    #     /    \
    #   1:a    2:b
    #   |  \
    #  3:c  4:d
    par = torch.tensor([0, 0, 1, 1])
    tree = Tree(torch.tensor([10, 11, 12, 13]), par, torch.tensor([1, 1, 2, 2]), tree_mask(par))
    # target argmax after each node (root, 1..4)
    assert greedy_accept(tree, [10, 13, 99, 0, 42]) == ([0, 1, 4], 42)
    assert greedy_accept(tree, [11, 0, 0, 0, 0]) == ([0, 2], 0)
    assert greedy_accept(tree, [77, 0, 0, 0, 0]) == ([0], 77)


@pytest.mark.parametrize("seed", range(3))
def test_tree_verification_equals_sequential(target, seed):
    """Logits of every tree node from ONE masked forward == the target run serially over the node's
    path (fresh, plain causal); after acceptance the cache equals the serial cache of the path."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 64, (1, 9), generator=g)
    tree = random_tree(10, seed)
    side = TargetSide(target)
    cache = side.new_cache()
    side.forward(prefix[:, :-1], cache)
    n = cache_len(cache)
    root = int(prefix[0, -1])
    ids = torch.cat([torch.tensor([root]), tree.tokens])[None]
    pos = (n + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths]))[None]
    allowed = torch.cat([torch.ones(tree.size + 1, n, dtype=torch.bool), tree.mask], 1)
    feats = side.forward(ids, cache, position_ids=pos, mask=additive_mask(allowed, torch.float64))
    logits = side.logits(feats)
    par = tree.parents.tolist()
    toks = [root] + tree.tokens.tolist()
    for i in range(tree.size + 1):
        path = sorted(ancestors(par, i))
        seq = torch.cat([prefix[:, :-1], torch.tensor([[toks[j] for j in path]])], 1)
        ref = target(input_ids=seq).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-9, atol=1e-9)

    # acceptance + KV gather: force a path by making the verdict follow a deepest chain
    deepest = max(range(tree.size + 1), key=lambda i: len(ancestors(par, i)))
    chain = sorted(ancestors(par, deepest))
    cache2 = side.new_cache()
    side.forward(prefix[:, :-1], cache2)
    verdict_path, _, new = side.verify(cache2, root, tree)
    # the verdict follows the target's own argmax; the serial cache over the same path must match
    seq = torch.cat([prefix[:, :-1], torch.tensor([[toks[j] for j in verdict_path]])], 1)
    serial = side.new_cache()
    side.forward(seq, serial)
    assert cache_len(cache2) == cache_len(serial) == seq.shape[1]
    for a, b in zip(cache2.layers, serial.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=1e-9)
    assert len(new) == len(verdict_path)  # accepted draft tokens + 1 bonus
    assert chain[0] == 0


@pytest.mark.parametrize("depth,top_k", [(2, 3), (3, 2)])
def test_draft_tree_children_equal_serial_draft(target, depth, top_k):
    """Every expanded node's children in the draft tree == top-k of the draft run serially over the
    node's path (checks the draft's tree mask, positions and cache cut)."""
    draft = DraftHead.for_target(target, "dgf", 2, seed=1).double()
    total = top_k + (depth - 1) * top_k * top_k
    s = DraftSession(draft, total, depth, top_k)
    g = torch.Generator().manual_seed(0)
    m = 7
    feats = torch.randn(m, target.config.hidden_size, dtype=torch.float64, generator=g)
    toks = torch.randint(0, 64, (m,), generator=g)
    tree = s.propose(feats, toks)
    assert s.stable == m and cache_len(s.cache) == m  # the cache is cut back to the verified prefix

    def serial(path_tokens):
        """Draft serially over the prefix then the path: returns top-k tokens after the path."""
        f, t = feats.clone(), toks.clone()
        out = draft(f[None], t[None], torch.arange(len(t))[None])[0]
        for tok in path_tokens:
            f = torch.cat([f, out[-1:]])
            t = torch.cat([t, torch.tensor([tok])])
            out = draft(f[None], t[None], torch.arange(len(t))[None])[0]
        return set(draft.logits(out[-1]).topk(top_k).indices.tolist())

    par = tree.parents.tolist()
    node_tok = [None] + tree.tokens.tolist()
    children = {}
    for i, p in enumerate(par, start=1):
        children.setdefault(p, set()).add(node_tok[i])
    assert children[0] == serial([])
    checked = 0
    for node, kids in children.items():
        if node == 0:
            continue
        path = [node_tok[j] for j in sorted(ancestors(par, node)) if j]
        assert kids == serial(path)
        checked += 1
    assert checked >= top_k  # expanded nodes at depth >= 1 were compared
