"""The linear-chain CRF of every MANGO tagger: CRFHead in torch (training, test, predict) and its numpy twin for
bundles (viterbi, marginals, crf_tags). Every function reads emissions whose PAD label is pinned at NEG (CRFHead._pin,
pin_pad), so PAD is never decoded.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torchcrf import CRF

NEG = -1e4  # the PAD label's pinned emission


# ----------------------------------------------------------------------------- valid paths and tag spaces

def bio_bans(num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [L], transitions [L, L] from -> to): -1e4 where a BIO path may not go, 0 elsewhere, for the label
    layout of dataloader.LabelMap (PAD, O, then B-X, I-X of each type): I-X never starts a post and follows only B-X
    or I-X."""
    start, trans = torch.zeros(num_labels), torch.zeros(num_labels, num_labels)
    for i in range(3, num_labels, 2):  # I-X at odd ids from 3, its B-X just before
        start[i] = -1e4
        trans[:, i] = -1e4
        trans[i - 1:i + 1, i] = 0.0
    return start, trans


# --tag_scheme bioes: the CRF scores PAD, O, then B-X, I-X, E-X, S-X of each type (4 per type); the data, the loss's
# input and every output stay BIO (LabelMap ids), converted at the CRF's edge
def bioes_to_bio(num_labels: int) -> torch.Tensor:
    """[2 + 2 (L - 2)] BIOES score index -> LabelMap id: B-X, S-X -> B-X; I-X, E-X -> I-X."""
    ids = [0, 1]
    for b in range(2, num_labels, 2):
        ids += [b, b + 1, b + 1, b]
    return torch.tensor(ids)


def bio_to_bioes(labels, mask):
    """LabelMap ids [B, W] (valid IOB2 where mask [B, W]) -> BIOES score ids: a chunk's last word is E-X (S-X when the
    chunk is one word); PAD and O keep their ids."""
    lab = labels * mask
    nxt = torch.cat([lab[:, 1:], torch.zeros_like(lab[:, :1])], 1)
    inside = lab >= 2
    typ = (lab - 2).clamp_min(0) // 2
    goes_on = nxt == 3 + 2 * typ                                                  # the next word is I- of this type
    is_b = (lab - 2) % 2 == 0
    offset = torch.where(is_b, torch.where(goes_on, 0, 3), torch.where(goes_on, 1, 2))
    return torch.where(inside, 2 + 4 * typ + offset, lab)


def bioes_bans(num_labels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, end [S], transitions [S, S]) over BIOES scores: -1e4 where a BIOES path may not go. I-X and E-X follow
    only B-X or I-X; O, B-Y and S-Y only O, E-X or S-X; a post starts outside a chunk and ends outside one."""
    n = 2 + 2 * (num_labels - 2)
    start, end, trans = torch.zeros(n), torch.zeros(n), torch.full((n, n), -1e4)
    # O opens and closes a gap; PAD is pinned
    opens, closes = [1], [0, 1]
    for b in range(2, n, 4):
        opens += [b, b + 3]
        closes += [b + 2, b + 3]
        trans[b:b + 2, b + 1:b + 3] = 0.0                                        # B/I -> I/E of the same type
        start[b + 1:b + 3] = -1e4
        end[b:b + 2] = -1e4
    trans[torch.tensor(closes)[:, None], torch.tensor(opens)[None, :]] = 0.0
    trans[0, :] = 0.0                                                             # PAD never occurs (pinned emission)
    return start, end, trans


def forward_backward(em, mask, start, end, trans):
    """log marginals [B, W, L] of a linear-chain CRF: alpha_t + beta_t - log Z, from emissions em [B, W, L] (words a
    prefix of mask [B, W]), start [L], end [L], transitions [L, L] (from -> to). Differentiable in all of them."""
    W = em.size(1)
    alpha = [start + em[:, 0]]                                                    # [B, L] each
    for t in range(1, W):
        nxt = torch.logsumexp(alpha[-1][:, :, None] + trans + em[:, t, None, :], dim=1)
        alpha.append(torch.where(mask[:, t, None], nxt, alpha[-1]))
    beta = [end.expand_as(alpha[0])]                                              # built from the last word back
    for t in range(W - 2, -1, -1):  # a padded word t + 1 keeps beta = end: word t is then the post's last
        nxt = torch.logsumexp(trans + (em[:, t + 1] + beta[-1])[:, None, :], dim=2)
        beta.append(torch.where(mask[:, t + 1, None], nxt, beta[-1]))
    log_z = torch.logsumexp(alpha[-1] + end, dim=1)                               # [B]
    return torch.stack(alpha, 1) + torch.stack(beta[::-1], 1) - log_z[:, None, None]


class CRFHead(nn.Module):
    """Linear-chain CRF over word emissions [B, W, S] with a bool word mask [B, W] (first word always on).

    Labels in and label ids out are LabelMap's BIO ids [L]. With bioes (--tag_scheme bioes) the CRF scores S = 2 + 4K
    BIOES tags (bio_to_bioes / bioes_to_bio at its edge), else S = L. With bio=True (--bio_constraints) decoding and
    tag probabilities keep to valid paths (bio_bans, bioes_bans), and the training split's labels are IOB2
    (Tagger.iob2_targets); the loss is the plain CRF's, so the same weights decode both ways.
    """

    def __init__(self, num_labels: int, bio: bool = False, bioes: bool = False):
        super().__init__()
        if bioes and num_labels % 2:  # LabelMap's layout: PAD, O, then a B-/I- pair per type
            raise ValueError(f"BIOES needs PAD, O and B-/I- pairs of labels; got {num_labels} labels")
        self.bioes = bioes
        self.register_buffer("to_bio", bioes_to_bio(num_labels) if bioes else torch.arange(num_labels),
                             persistent=False)
        self.n_scores = len(self.to_bio)
        # [L, S]: 0 where score tag s is label l, else -inf (log_marginals' BIOES -> BIO sum as one logsumexp)
        labels = torch.arange(int(self.to_bio.max()) + 1)[:, None]
        self.register_buffer("log_to_bio", torch.where(labels == self.to_bio, 0.0, float("-inf")), persistent=False)
        self.crf = CRF(self.n_scores, batch_first=True)  # start, end, transitions drawn from U(-0.1, 0.1)
        self.bio = bio
        if bioes:
            start, end, trans = bioes_bans(num_labels)
        else:
            (start, trans), end = bio_bans(num_labels), torch.zeros(num_labels)
        for name, x in (("ban_start", start), ("ban_end", end), ("ban", trans)):
            self.register_buffer(name, x, persistent=False)

    @staticmethod
    def _pin(em):
        return torch.cat([torch.full_like(em[..., :1], NEG), em[..., 1:]], -1).float()

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start [S], end [S], transitions [S, S]) that decoding uses: the CRF's own, plus the bans if bio."""
        c = self.crf
        if not self.bio:
            return c.start_transitions, c.end_transitions, c.transitions
        return c.start_transitions + self.ban_start, c.end_transitions + self.ban_end, c.transitions + self.ban

    def nll(self, em, labels, mask):
        """Negative log-likelihood of each post's labels [B] (pytorch-crf's, over every path)."""
        if self.bioes:
            labels = bio_to_bioes(labels, mask)
        return -self.crf(self._pin(em), labels, mask=mask, reduction="none")

    def loss(self, em, labels, mask):
        return self.nll(em, labels, mask).mean()

    def losses(self, *triples):
        """loss() of several (em, labels, mask) triples of one width W in a single CRF pass (its forward
        algorithm loops over W in Python, so one pass over the stacked posts costs about what one batch does)."""
        em, labels, mask = (torch.cat(x) for x in zip(*triples))
        per = self.nll(em, labels, mask)
        return [x.mean() for x in per.split([t[0].size(0) for t in triples])]

    def log_marginals(self, em, mask, temperature: float = 1.0) -> torch.Tensor:
        """log p(label at word | post) [B, W, L] in LabelMap's ids over the paths decoding may take, with every score
        divided by `temperature` (forward_backward; differentiable, so a student can learn a teacher's marginals).
        Padding words hold 0: read the result through `mask`."""
        start, end, trans = (x / temperature for x in self.scores())
        logm = forward_backward(self._pin(em) / temperature, mask, start, end, trans)     # [B, W, S]
        if self.bioes:  # B-X + S-X -> B-X, I-X + E-X -> I-X, summed in log space: [B, W, L]
            logm = torch.logsumexp(logm[..., None, :] + self.log_to_bio, -1)
        return logm * mask[..., None]

    @torch.no_grad()
    def decode(self, em, mask) -> list[list[int]]:
        """Viterbi by pytorch-crf's decode: the best label path of each post (its scored words only), over scores()."""
        crf = self.crf
        if self.bio:  # a copy holds the banned scores; the trained ones are never touched
            crf = copy.deepcopy(crf)
            for p, s in zip((crf.start_transitions, crf.end_transitions, crf.transitions), self.scores()):
                p.copy_(s)
        paths = crf.decode(self._pin(em), mask=mask)
        to_bio = self.to_bio.tolist()
        return [[to_bio[i] for i in row] for row in paths]


# ----------------------------------------------------------------------------- numpy twin (bundles)

def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def pin_pad(em: np.ndarray) -> np.ndarray:
    """Emissions [B, W, L] as float32 with the PAD label (0) pinned far below the others (CRFHead._pin)."""
    em = em.astype(np.float32, copy=True)
    em[..., 0] = NEG
    return em


def viterbi(em: np.ndarray, mask: np.ndarray, crf: dict) -> list[list[int]]:
    """Best label path of each post, as pytorch-crf decodes it. em [B, W, L] (pinned), mask [B, W] bool with the
    first word on and words as a prefix; crf: start [L], end [L], transitions [L, L] (from -> to)."""
    B, W, L = em.shape
    score = crf["start"][None] + em[:, 0]                                         # [B, L]
    history = []
    for t in range(1, W):
        nxt = score[:, :, None] + crf["transitions"][None] + em[:, t, None, :]    # [B, L(prev), L(cur)]
        history.append(nxt.argmax(1))
        score = np.where(mask[:, t, None], nxt.max(1), score)
    score = score + crf["end"][None]
    out = []
    for b in range(B):
        n = int(mask[b].sum())
        best = [int(score[b].argmax())]
        for hist in reversed(history[: n - 1]):
            best.append(int(hist[b, best[-1]]))
        out.append(best[::-1])
    return out


def marginals(em: np.ndarray, mask: np.ndarray, crf: dict) -> np.ndarray:
    """p(label at word | post) [B, W, L] by forward-backward in log space (0 on padding); em pinned as for viterbi."""
    B, W, L = em.shape
    trans = crf["transitions"][None]
    alpha = np.empty((B, W, L), np.float64)
    alpha[:, 0] = crf["start"][None] + em[:, 0]
    for t in range(1, W):
        nxt = _lse(alpha[:, t - 1, :, None] + trans + em[:, t, None, :], 1)
        alpha[:, t] = np.where(mask[:, t, None], nxt, alpha[:, t - 1])           # padding carries alpha over
    beta = np.empty((B, W, L), np.float64)
    beta[:, W - 1] = crf["end"][None]
    for t in range(W - 2, -1, -1):
        nxt = _lse(trans + (em[:, t + 1] + beta[:, t + 1])[:, None, :], 2)
        beta[:, t] = np.where(mask[:, t + 1, None], nxt, crf["end"][None])       # the last word meets `end`
    log_z = _lse(alpha[:, -1] + crf["end"][None], 1)
    return (np.exp(alpha + beta - log_z[:, None, None]) * mask[..., None]).astype(np.float32)


def crf_tags(em: np.ndarray, mask: np.ndarray, crf: dict) -> tuple[list[list[int]], np.ndarray]:
    """(Viterbi label ids per post, marginals [B, W, L]) in LabelMap's ids; em pinned. A CRF that scores BIOES tags
    (crf["to_bio"] [S]: each one's BIO id) is decoded over them, then B-X and S-X read as B-X, I-X and E-X as I-X."""
    ids, p = viterbi(em, mask, crf), marginals(em, mask, crf)
    if "to_bio" not in crf:
        return ids, p
    to_bio = crf["to_bio"]
    return [to_bio[row].tolist() for row in ids], p @ np.eye(int(to_bio.max()) + 1, dtype=p.dtype)[to_bio]
