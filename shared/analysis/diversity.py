"""Diversity of a set of generated texts: distinct-n and n-gram self-similarity.

| metric            | formula                                                                        |
|-------------------|--------------------------------------------------------------------------------|
| `distinct_n`      | |unique n-grams over the set| / |n-grams over the set| (0 when there are none) |
| `self_similarity` | mean over pairs i < j of Jaccard(G_n(i), G_n(j)), G_n = set of a text's n-grams |

`self_similarity` is a cheap stand-in for self-BLEU (Zhu et al. 2018): like self-BLEU it is high when
samples repeat each other's n-grams, but it uses one n, sets instead of clipped counts, and no
brevity penalty, so the values are not comparable with published self-BLEU numbers. Texts are
split by `tokenize` (whitespace by default); pass e.g. `list` for characters.

    from shared.analysis.diversity import diversity_report
    print(diversity_report(batch.completions))
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int, tokenize: Callable[[str], list[str]] = str.split) -> float:
    """Unique n-grams / total n-grams, pooled over all texts; 0 when there are no n-grams."""
    grams = [g for t in texts for g in _ngrams(tokenize(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_similarity(texts: list[str], n: int = 2, tokenize: Callable[[str], list[str]] = str.split) -> float:
    """Mean pairwise Jaccard similarity |G_i ∩ G_j| / |G_i ∪ G_j| of the texts' n-gram sets over all
    pairs i < j (a pair of texts without n-grams counts 0); 0 for fewer than 2 texts. Higher = less diverse."""
    sets = [set(_ngrams(tokenize(t), n)) for t in texts]
    pairs = list(combinations(sets, 2))
    if not pairs:
        return 0.0
    return sum(len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs) / len(pairs)


def diversity_report(texts: list[str], tokenize: Callable[[str], list[str]] = str.split) -> dict:
    """{"distinct_1", "distinct_2", "self_similarity" (bigrams), "mean_length" (tokens per text; 0 if none)}."""
    lengths = [len(tokenize(t)) for t in texts]
    return {"distinct_1": distinct_n(texts, 1, tokenize), "distinct_2": distinct_n(texts, 2, tokenize),
            "self_similarity": self_similarity(texts, 2, tokenize),
            "mean_length": sum(lengths) / len(lengths) if lengths else 0.0}
