"""Eager float64 references of the SuSana Distancia losses, one row at a time from their
definitions (full distance lists, Python loops over the rows)."""

import math

import torch

__all__ = ["proto_triplet_loss", "icnn_loss"]


def _d(a, b):
    return torch.sqrt(((a - b) ** 2).sum() + 1e-6)


def proto_triplet_loss(query, query_labels, support=None, support_labels=None, margin=0.5):
    q = query.double()
    s = q if support is None else support.double()
    sl = query_labels if support_labels is None else support_labels
    protos = {int(c): s[sl == c].mean(0) for c in torch.unique(sl)}
    terms = []
    for i in range(q.shape[0]):
        y = int(query_labels[i])
        d_pos = _d(q[i], protos[y])
        d_neg = min((_d(q[i], p) for c, p in protos.items() if c != y), key=lambda v: float(v.detach()))
        terms.append(torch.clamp(d_pos - d_neg + margin, min=0))
    return torch.stack(terms).mean()


def icnn_loss(emb, labels, target=None, target_labels=None, k=4, num_neighbors=None):
    eps = 1e-7
    x = emb.double()
    same_set = target is None
    t = x if same_set else target.double()
    tl = labels if same_set else target_labels
    m = t.shape[0]
    clipped = k + 2 >= m
    k = m - 2 if clipped else k
    n_nb = k + 1 if num_neighbors is None else num_neighbors
    rows = []
    for i in range(x.shape[0]):
        cand = [(_d(x[i], t[j]), bool(tl[j] == labels[i])) for j in range(m) if not (same_set and j == i)]
        cand.sort(key=lambda c: float(c[0].detach()))
        rows.append(cand[:n_nb])
    sc_terms, dc_lists, n_same_all = [], [], []
    for nb in rows:
        others = [d for d, same in nb if not same]
        # amin / amax share a tied extreme's gradient equally (torch's rule): equal distances
        # (duplicated embeddings) are a kink where any split is a subgradient; this is the one
        # the op documents
        delta = torch.stack(others).amin() if others else torch.tensor(math.inf, dtype=torch.float64)
        u = [d / (delta + eps) for d, _ in nb[:k]]
        top = torch.clamp(torch.stack(u).amax(), min=1.0)  # (its gradient passes at the bound)
        same_u = [v / top for v, (_, same) in zip(u, nb[:k]) if same]
        n_same_all.append(len(same_u))
        if same_u:
            sc_terms.append(sum(same_u) / (len(same_u) + eps))
        dc_lists.append([d for d, same in nb[:k] if not same])
    lambda_sc = 1 - sum(sc_terms) / (len(sc_terms) + eps)
    all_dc = [d for lst in dc_lists for d in lst]
    if all_dc:
        big = torch.stack(all_dc).amax() + eps
        dc_terms = [sum(d / big for d in lst) / (len(lst) + eps) for lst in dc_lists if lst]
        lambda_dc = sum(dc_terms) / (len(dc_terms) + eps)
    else:
        lambda_dc = torch.tensor(1.0, dtype=torch.float64)
    gamma = 1.0 if clipped else sum(n / k for n in n_same_all) / len(rows)
    score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2
    return -torch.log(score)
