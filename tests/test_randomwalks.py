"""The randomwalks task reproduces trlX's exactly, and its metric agrees with an independent reference."""

import itertools

import numpy as np
import pytest
from transformers import AutoTokenizer

import sft


def test_seed_1000_matches_trlx_figures():
    adjacency, walks = sft.generate_random_walks(seed=1000)
    assert adjacency.sum() - 1 == 51  # edges besides the goal's self-loop
    assert adjacency[0].tolist() == [True] + [False] * 20
    assert sft.shortest_path_nodes(adjacency)[1:] == [3, 4, 2, 4, 3, 5, 5, 3, 3, 3, 4, 4, 2, 5, 4, 4, 4, 3, 4, 4]
    letters = ["".join(sft.node_letter(n) for n in walk) for walk in walks]
    assert letters[:3] == ["sda", "fda", "ebjnbdtkna"]
    assert len(walks) == 1000 and max(map(len, walks)) == 10
    shortest = sft.shortest_path_nodes(adjacency)
    scores = np.array([sft.walk_optimality(w, adjacency, shortest) for w in letters])
    assert round(scores.mean(), 4) == 0.3515
    assert round((scores == 1).mean(), 3) == 0.184
    assert round((scores == 0).mean(), 3) == 0.495


def reference_shortest(adjacency):
    """Shortest node counts to node 0 by Floyd-Warshall, a method unlike the script's BFS."""
    n = len(adjacency)
    distance = np.where(adjacency, 1.0, np.inf)
    np.fill_diagonal(distance, 0.0)
    for k, i, j in itertools.product(range(n), repeat=3):
        distance[i, j] = min(distance[i, j], distance[i, k] + distance[k, j])
    return [None if np.isinf(d) else int(d) + 1 for d in distance[:, 0]]


def reference_optimality(walk, adjacency, reference_nodes, max_nodes=10):
    """The metric written the long way: find the first arrival at the goal, then check the prefix."""
    letters = [chr(ord("a") + i) for i in range(len(adjacency))]
    if not walk or walk[0] not in letters[1:] or reference_nodes[letters.index(walk[0])] is None or "a" not in walk[1:]:
        return 0.0
    length = walk.index("a", 1) + 1
    prefix = walk[:length]
    if any(letter not in letters for letter in prefix):
        return 0.0
    if not all(adjacency[letters.index(x), letters.index(y)] for x, y in zip(prefix, prefix[1:])):
        return 0.0
    return max(0.0, (max_nodes - length) / (max_nodes - reference_nodes[letters.index(walk[0])]))


@pytest.mark.parametrize("seed", [0, 7, 1000, 31337])
def test_optimality_matches_reference(seed):
    adjacency, walks = sft.generate_random_walks(seed=seed, n_walks=200)
    shortest = sft.shortest_path_nodes(adjacency)
    reference_nodes = reference_shortest(adjacency)
    assert shortest == reference_nodes
    rng = np.random.RandomState(seed)
    candidates = ["".join(sft.node_letter(n) for n in walk) for walk in walks]
    # Random strings and corrupted walks exercise invalid letters, missing edges and long walks.
    candidates += ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.randint(1, 14))) for _ in range(300)]
    for walk in candidates[:200]:
        position = rng.randint(len(walk))
        candidates.append(walk[:position] + sft.node_letter(rng.randint(21)) + walk[position + 1 :])
    for walk in candidates:
        assert sft.walk_optimality(walk, adjacency, shortest) == pytest.approx(
            reference_optimality(walk, adjacency, reference_nodes), abs=1e-12
        ), walk
    scores = [sft.walk_optimality(w, adjacency, shortest) for w in candidates]
    assert 0 < np.mean(scores) < 1 and max(scores) == 1.0  # the sample covers both ends of the scale


def test_optimality_edge_cases():
    adjacency, _ = sft.generate_random_walks()
    shortest = sft.shortest_path_nodes(adjacency)
    assert sft.walk_optimality("sda", adjacency, shortest) == 1.0  # s -> d -> a is a shortest path (3 nodes)
    assert sft.walk_optimality("sdaxyz", adjacency, shortest) == 1.0  # whatever follows the goal is ignored
    assert sft.walk_optimality("sdx", adjacency, shortest) == 0.0  # an unknown letter before it is not
    assert sft.walk_optimality("s", adjacency, shortest) == 0.0  # never reaches the goal
    assert sft.walk_optimality("sa", adjacency, shortest) == 0.0  # s -> a is no edge
    assert sft.walk_optimality("s<pad>", adjacency, shortest) == 0.0
    assert sft.walk_optimality("", adjacency, shortest) == 0.0


def test_tokenizer_round_trip(tmp_path):
    tokenizer = sft.randomwalks_tokenizer()
    assert len(tokenizer) == 24
    ids = tokenizer("ebjnbdtkna")["input_ids"]
    assert ids == [4, 1, 9, 13, 1, 3, 19, 10, 13, 0]  # token id = node index
    assert tokenizer.decode(ids) == "ebjnbdtkna"
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id}) == 2 and tokenizer.eos_token_id not in ids
    assert (
        tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True)
        == "ebjnbdtkna"
    )
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("sda")["input_ids"] == [18, 3, 0]
    assert loaded.decode([18, 3, 0]) == "sda"
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
