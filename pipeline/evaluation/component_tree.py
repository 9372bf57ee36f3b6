"""Component trees of thresholded maps, every threshold in one pass (for ``pipeline.evaluation.metrics``).

Numba-compiled, one image at a time; pure functions of arrays. Thresholding a map of
integer levels at k keeps the pixels of level > k, so going down from the top level the
foreground only grows, one level's pixels at a time: a union-find over the pixels, taken
in decreasing level order (a counting sort), holds the components of every threshold in
turn. Each root keeps its component's pixel count, bounding box, first pixel in raster
order and, where asked, its contour area; at each threshold that is asked for, one walk
over the live roots gives the figures of that threshold. ``metrics`` documents the rules
(wsolevaluation's boxes, the SAT rule's) that these figures implement.

Pixels live on a grid padded by one pixel on every side (never in the set), so a
neighbour needs no bounds test; the padded index orders like the raster index. The pixel
loops are written out in the big functions: a call that passes arrays costs more than
the work of one pixel.

Compiled with ``cache=True``: the first call in a fresh process loads the machine code
from ``__pycache__`` next to this file (or ``NUMBA_CACHE_DIR``, or the user's cache
directory), 0.3 to 0.7 s; the first compile takes 7 to 12 s for ``wsol_sweep`` (2-core
Xeon, idle to loaded) and 1.5 to 2.5 s more for ``satloc_sweep``. Where no cache
location is writable, ``_jit`` warns and compiles in each process.
"""
from __future__ import annotations

import warnings

import numpy as np
from numba import njit

_UNCACHED: list[str] = []


def _jit(fn):
    """``njit(cache=True, nogil=True)``; where numba finds no writable place for its cache
    (this package's ``__pycache__``, ``NUMBA_CACHE_DIR``, the user's cache directory),
    it raises at decoration: then compile without a cache, once per process."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        if not _UNCACHED:
            warnings.warn("pipeline.evaluation.component_tree: no writable numba cache directory (set NUMBA_CACHE_DIR); "
                          "the sweep compiles in each process (seconds)", RuntimeWarning, stacklevel=2)
        _UNCACHED.append(fn.__name__)
        return njit(nogil=True)(fn)


WSOL_LEVELS = 256  # uint8 values: thresholds 0 .. 255


# Per-root fields of ``info`` (int32, one row per padded pixel; valid on roots).
_SIZE, _X0, _Y0, _X1, _Y1, _FIRST, _AREA2 = 0, 1, 2, 3, 4, 5, 6
_FIELDS = 8  # a 32-byte row
# The rules of ``_superlevel``, passed in a one-element array: a literal argument would
# give numba one more compiled version of it per value.
_OUTER, _FILLED, _SATLOC = 0, 1, 2


def _ring_pick() -> np.ndarray:
    """For each set of a pixel's 8 neighbours in the foreground (bit d: N, NE, E, SE, S,
    SW, W, NW), the neighbours to look up: one per run of neighbours that follow each
    other 8-adjacently (consecutive around the ring; N, E, S, W around the pixel)."""
    pick = np.zeros(256, np.int64)
    for mask in range(256):
        on = [(mask >> d) & 1 for d in range(8)]
        for d in range(8):
            skip = (d > 0 and on[d - 1]) or (d % 2 == 0 and d > 0 and on[d - 2]) or (d == 7 and on[0])
            if on[d] and not skip:
                pick[mask] |= 1 << d
    return pick


_RING_PICK = _ring_pick()
# 4 x the Euler number (8-connected) of a 2 x 2 window by the set of its pixels inside
# (bits: top-left, top-right, bottom-left, bottom-right): one pixel +1, three -1, two on
# a diagonal -2 (Gray's quad counting).
_EULER4 = np.array([0, 1, 1, 0, 1, 0, -2, -1, 1, -2, 0, -1, 0, -1, -1, 0], np.int64)
_FIRST_BIT = np.array([0] + [(m & -m).bit_length() - 1 for m in range(1, 256)], np.int64)


@_jit
def _bucket(image, n_levels, order, start):
    """Counting sort of the pixels of an (h, w) map of levels 0 .. n_levels: level v's
    padded indices are ``order[start[v]:start[v + 1]]``, in raster order."""
    h, w = image.shape
    w2 = w + 2
    start[:] = 0
    for y in range(h):
        for x in range(w):
            start[image[y, x] + 1] += 1
    for v in range(n_levels + 1):
        start[v + 1] += start[v]
    for y in range(h):
        row = (y + 1) * w2 + 1
        for x in range(w):
            v = image[y, x]
            order[start[v]] = row + x
            start[v] += 1
    for v in range(n_levels, 0, -1):
        start[v] = start[v - 1]
    start[0] = 0


@_jit
def _box_iou(x0, y0, x1, y1, gt, plus_one):
    """Best IoU of the box with the GT boxes (G, 4) float64: ``plus_one`` as
    wsolevaluation (x1/y1 inclusive), else x1/y1 exclusive (satloc)."""
    best = 0.0
    e = 1.0 if plus_one else 0.0
    for g in range(gt.shape[0]):
        iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + e
        ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + e
        iw = iw if iw > 0.0 else 0.0
        ih = ih if ih > 0.0 else 0.0
        inter = iw * ih
        union = (x1 - x0 + e) * (y1 - y0 + e) + (gt[g, 2] - gt[g, 0] + e) * (gt[g, 3] - gt[g, 1] + e) - inter
        iou = inter / union if union > 0.0 else 0.0
        if iou > best:
            best = iou
    return best


@_jit
def _component_iou(info, r, h, w, gt, wsol):
    """IoU of root r's box: wsolevaluation's ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]``
    of the bounding rectangle, or satloc's exclusive ``[x0, y0, x1 + 1, y1 + 1]``."""
    x0, y0, x1, y1 = info[r, _X0], info[r, _Y0], info[r, _X1] + 1, info[r, _Y1] + 1
    if wsol:
        return _box_iou(float(x0), float(y0), float(min(x1, w - 1)), float(min(y1, h - 1)), gt, True)
    return _box_iou(float(x0), float(y0), float(x1), float(y1), gt, False)


@_jit
def _new_root(parent, info, dirty, p, x, y):
    parent[p] = p
    info[p, _SIZE] = 1
    info[p, _X0] = x
    info[p, _Y0] = y
    info[p, _X1] = x
    info[p, _Y1] = y
    info[p, _FIRST] = p
    info[p, _AREA2] = 0
    dirty[p] = True


@_jit
def _attach(parent, info, dirty, p, x, y, r):
    """Pixel p joins root r (p comes later in this pass than r's pixels: no rank to keep)."""
    parent[p] = r
    info[r, _SIZE] += 1
    info[r, _X0] = min(info[r, _X0], x)
    info[r, _Y0] = min(info[r, _Y0], y)
    info[r, _X1] = max(info[r, _X1], x)
    info[r, _Y1] = max(info[r, _Y1], y)
    info[r, _FIRST] = min(info[r, _FIRST], p)
    dirty[r] = True


@_jit
def _merge(parent, info, dirty, a, b):
    """Union by size of roots a != b; returns the new root."""
    if info[a, _SIZE] < info[b, _SIZE]:
        a, b = b, a
    parent[b] = a
    info[a, _SIZE] += info[b, _SIZE]
    info[a, _X0] = min(info[a, _X0], info[b, _X0])
    info[a, _Y0] = min(info[a, _Y0], info[b, _Y0])
    info[a, _X1] = max(info[a, _X1], info[b, _X1])
    info[a, _Y1] = max(info[a, _Y1], info[b, _Y1])
    info[a, _FIRST] = min(info[a, _FIRST], info[b, _FIRST])
    info[a, _AREA2] += info[b, _AREA2]
    dirty[a] = True
    return a


@_jit
def _superlevel(image, n_levels, needed, gt, rule, best, largest, counts,
                xs, ys, parent, info, dirty, iou, live, order, start, count):
    """8-connected components of ``{image > k}`` for k = n_levels - 1 down to 0, of an
    (h, w) map of levels 0 .. n_levels.

    ``rule[0]``: wsolevaluation's outer contours (_OUTER), its filled components
    (_FILLED, with their contour areas), or satloc's rule (_SATLOC). At each k with
    ``needed[k]``: ``best[k]`` the best IoU over the components' boxes, ``largest[k]``
    the IoU of the largest component's box (not for _OUTER), -1 where the set is empty;
    ``counts[k]`` the number of components. Largest: for _FILLED by contour area (2 x 2
    windows with 4 pixels inside count 1, with 3 count 0.5), ties to the last first
    pixel in raster order (OpenCV's listing); for _SATLOC by pixel count, ties to the
    first first pixel.

    Two pixels of the set that are 8-adjacent are already in one component (the later
    one joined the earlier). Around a new pixel, the neighbours N, NE, E, SE, S, SW, W,
    NW follow each other 8-adjacently, and so do N, E, S, W: a neighbour next to one
    already looked at needs no find.
    """
    wsol, windows = rule[0] != _SATLOC, rule[0] == _FILLED
    h, w = image.shape
    w2 = w + 2
    ring = np.array([-w2, -w2 + 1, 1, w2 + 1, w2, w2 - 1, -1, -w2 - 1])  # N, NE, E, SE, S, SW, W, NW
    corners = np.array([0, 1, w2, w2 + 1])  # p's 2 x 2 windows, by their top-left pixel
    _bucket(image, n_levels, order, start)
    parent[:] = -1
    if windows:
        count[:] = 0
    n_live = 0
    for k in range(n_levels - 1, -1, -1):
        lo, hi = start[k + 1], start[k + 2]
        for i in range(lo, hi):
            p = order[i]
            mask = 0
            for d in range(8):
                if parent[p + ring[d]] >= 0:
                    mask |= 1 << d
            if mask == 0:  # a new component
                parent[p] = p
                info[p, _SIZE] = 1
                info[p, _X0] = info[p, _X1] = xs[p]
                info[p, _Y0] = info[p, _Y1] = ys[p]
                info[p, _FIRST] = p
                info[p, _AREA2] = 0
                dirty[p] = True
                live[n_live] = p
                n_live += 1
                root = p
            else:
                pick = _RING_PICK[mask]
                d = _FIRST_BIT[pick]
                root = p + ring[d]
                while parent[root] != root:  # find, halving the path
                    up = parent[parent[root]]
                    parent[root] = up
                    root = up
                pick ^= 1 << d
                while pick:  # more runs: they may be other components
                    d = _FIRST_BIT[pick]
                    pick ^= 1 << d
                    q = p + ring[d]
                    while parent[q] != q:
                        up = parent[parent[q]]
                        parent[q] = up
                        q = up
                    if q != root:
                        root = _merge(parent, info, dirty, root, q)
                parent[p] = root  # p joins; it comes last, so no rank to keep
                info[root, _SIZE] += 1
                info[root, _X0] = min(info[root, _X0], xs[p])
                info[root, _Y0] = min(info[root, _Y0], ys[p])
                info[root, _X1] = max(info[root, _X1], xs[p])
                info[root, _Y1] = max(info[root, _Y1], ys[p])
                info[root, _FIRST] = min(info[root, _FIRST], p)
                dirty[root] = True
            if windows:
                # A window's pixels in the set are 8-adjacent: when its third and fourth
                # pixels come in, they are in p's component.
                add = 0
                for b in range(4):
                    c = p - corners[b]
                    n_in = count[c] + 1
                    count[c] = n_in
                    if n_in >= 3:
                        add += 1
                info[root, _AREA2] += add
        if not needed[k]:
            continue
        j = 0
        top = -1.0
        pick = -1
        for i in range(n_live):
            r = live[i]
            if parent[r] != r:
                continue
            live[j] = r
            j += 1
            if windows:
                if pick < 0 or info[r, _AREA2] > info[pick, _AREA2] or (
                    info[r, _AREA2] == info[pick, _AREA2] and info[r, _FIRST] > info[pick, _FIRST]
                ):
                    pick = r
            elif not wsol:
                if pick < 0 or info[r, _SIZE] > info[pick, _SIZE] or (
                    info[r, _SIZE] == info[pick, _SIZE] and info[r, _FIRST] < info[pick, _FIRST]
                ):
                    pick = r
            if dirty[r]:
                iou[r] = _component_iou(info, r, h, w, gt, wsol)
                dirty[r] = False
            if iou[r] > top:
                top = iou[r]
        n_live = j
        counts[k] = j
        best[k] = top if j else -1.0
        largest[k] = _component_iou(info, pick, h, w, gt, wsol) if pick >= 0 else -1.0


@_jit
def _inner(info, r, h, w):
    return info[r, _X0] > 0 and info[r, _Y0] > 0 and info[r, _X1] < w - 1 and info[r, _Y1] < h - 1


@_jit
def _fill_list(head, nxt, r, t, fill):
    """The hole r joins the border's background at t: its pixels' filled level is t."""
    p = head[r]
    while p >= 0:
        fill[p] = t
        p = nxt[p]


@_jit
def _holes(image, needed, gt, best, n_holes, euler4, fill, img_bits, bg_bits,
           xs, ys, parent, info, dirty, iou, live, order, start, head, tail, nxt):
    """4-connected components of the background ``{image <= t}`` for t = 0 .. 255, of
    an (h, w) uint8 map.

    Holes are those off the image border. ``best[t]``: at each needed t, the best IoU of
    a hole's inner-contour box (the hole's box grown by one pixel, clipped as
    wsolevaluation), -1 without a hole. ``fill`` (padded): per pixel the lowest t at
    which its background component touches the border; ``{fill > t}`` is the
    foreground at t with its holes filled. Each hole keeps a list of its pixels
    (``head``, ``nxt``, ``tail``) until it reaches the border, so every pixel gets its
    filled level once.

    Also, at each needed t, ``n_holes[t]`` and ``euler4[t]``: 4 x the Euler number of
    the foreground ``{image > t}`` (8-connected), from its 2 x 2 windows (``_EULER4``;
    ``img_bits``: per window, its pixels in the image; ``bg_bits``: those in the
    background). Components = Euler number + holes.
    """
    h, w = image.shape
    w2 = w + 2
    cross = np.array([-w2, -1, 1, w2])
    corners = np.array([0, 1, w2, w2 + 1])  # p's windows: top-left p - corners[b], p is its bit b
    _bucket(image, WSOL_LEVELS, order, start)
    parent[:] = -1
    bg_bits[:] = 0
    e4 = 4  # the whole image: one component, no hole
    n_live = 0
    for t in range(WSOL_LEVELS):
        for i in range(start[t], start[t + 1]):
            p = order[i]
            x, y = xs[p], ys[p]
            for b in range(4):
                c = p - corners[b]
                old = img_bits[c] & ~bg_bits[c]
                bg_bits[c] |= 1 << b
                e4 += _EULER4[old & ~(1 << b)] - _EULER4[old]
            root = -1
            for d in range(4):
                q = p + cross[d]
                if parent[q] < 0:
                    continue
                while parent[q] != q:  # find, halving the path
                    up = parent[parent[q]]
                    parent[q] = up
                    q = up
                if root < 0:
                    root = q
                    continue
                if q == root:
                    continue
                inner_a, inner_b = _inner(info, root, h, w), _inner(info, q, h, w)
                if inner_a and inner_b:  # two holes: one list
                    first, last = head[root], tail[q]
                    nxt[tail[root]] = head[q]
                    root = _merge(parent, info, dirty, root, q)
                    head[root] = first
                    tail[root] = last
                    continue
                if inner_a:  # a hole reaches the border
                    _fill_list(head, nxt, root, t, fill)
                elif inner_b:
                    _fill_list(head, nxt, q, t, fill)
                root = _merge(parent, info, dirty, root, q)
            if root < 0:
                _new_root(parent, info, dirty, p, x, y)
                if _inner(info, p, h, w):
                    head[p] = p
                    tail[p] = p
                    nxt[p] = -1
                    live[n_live] = p
                    n_live += 1
                else:
                    fill[p] = t
            elif _inner(info, root, h, w):
                _attach(parent, info, dirty, p, x, y, root)
                if _inner(info, root, h, w):
                    nxt[p] = -1
                    nxt[tail[root]] = p
                    tail[root] = p
                else:  # p is on the border
                    _fill_list(head, nxt, root, t, fill)
                    fill[p] = t
            else:  # the border's background: its box and IoU no longer matter
                parent[p] = root
                info[root, _SIZE] += 1
                fill[p] = t
        if not needed[t]:
            continue
        j = 0
        top = -1.0
        for i in range(n_live):
            r = live[i]
            if parent[r] != r or not _inner(info, r, h, w):
                continue
            live[j] = r
            j += 1
            if dirty[r]:
                iou[r] = _box_iou(float(info[r, _X0] - 1), float(info[r, _Y0] - 1),
                                  float(min(info[r, _X1] + 2, w - 1)), float(min(info[r, _Y1] + 2, h - 1)), gt, True)
                dirty[r] = False
            if iou[r] > top:
                top = iou[r]
        n_live = j
        best[t] = top
        n_holes[t] = j
        euler4[t] = e4


@_jit
def _coordinates(h, w):
    """Column and row of each padded index (-1 .. w, -1 .. h)."""
    w2 = w + 2
    m = (h + 2) * w2
    xs = np.empty(m, np.int32)
    ys = np.empty(m, np.int32)
    for p in range(m):
        xs[p] = p % w2 - 1
        ys[p] = p // w2 - 1
    return xs, ys


@_jit
def _image_bits(h, w):
    """Per 2 x 2 window (by its top-left padded index), the bits of its pixels in the image."""
    w2 = w + 2
    bits = np.zeros((h + 2) * w2, np.int8)
    for y in range(h):
        for x in range(w):
            p = (y + 1) * w2 + x + 1
            bits[p] |= 1
            bits[p - 1] |= 2
            bits[p - w2] |= 4
            bits[p - w2 - 1] |= 8
    return bits


@_jit
def wsol_sweep(q, needed, gt):
    """wsolevaluation's box IoUs at every threshold t of uint8 maps ``q`` (n, h, w).

    ``needed`` (n, 256) bool: the thresholds to evaluate; ``gt`` (n, G, 4) float64 boxes
    (x1/y1 inclusive). Returns (best, largest), each (n, 256) float64: per threshold t
    (foreground ``q > t``) the best IoU over every contour's box (outer and inner), and
    the IoU of the largest contour's box; with no contour, the box ``[0, 0, 0, 0]``'s.
    Unneeded thresholds hold -1.

    Per image: the background tree (holes, the filled map, the Euler numbers), then the
    tree of the filled map (every top-level component: its box, its contour area). An
    outer contour of a component nested in a hole is not among those; where the
    component counts say there is one (components = Euler number + holes, more than the
    top-level ones), the tree of the map itself gives every outer contour.
    """
    n, h, w = q.shape
    m = (h + 2) * (w + 2)
    parent = np.empty(m, np.int32)
    info = np.empty((m, _FIELDS), np.int32)
    dirty = np.empty(m, np.bool_)
    iou = np.empty(m)
    live = np.empty(m, np.int32)
    order = np.empty(m, np.int32)
    start = np.empty(WSOL_LEVELS + 2, np.int64)
    count = np.empty(m, np.int8)
    head = np.empty(m, np.int32)
    tail = np.empty(m, np.int32)
    nxt = np.empty(m, np.int32)
    fill = np.empty(m, np.uint8)
    filled = np.empty((h, w), np.uint8)  # the same type as a map: one compiled _superlevel
    bg_bits = np.empty(m, np.int8)
    img_bits = _image_bits(h, w)
    xs, ys = _coordinates(h, w)
    best = np.full((n, WSOL_LEVELS), -1.0)
    largest = np.full((n, WSOL_LEVELS), -1.0)
    outer = np.empty(WSOL_LEVELS)
    holes = np.empty(WSOL_LEVELS)
    filled_best = np.empty(WSOL_LEVELS)
    filled_largest = np.empty(WSOL_LEVELS)
    unused = np.empty(WSOL_LEVELS)
    n_holes = np.zeros(WSOL_LEVELS, np.int64)
    euler4 = np.zeros(WSOL_LEVELS, np.int64)
    n_filled = np.zeros(WSOL_LEVELS, np.int64)
    n_outer = np.zeros(WSOL_LEVELS, np.int64)
    top = WSOL_LEVELS - 1  # no pixel is above 255
    outer_rule, filled_rule = np.array([_OUTER]), np.array([_FILLED])
    for i in range(n):
        g = gt[i]
        _holes(q[i], needed[i], g, holes, n_holes, euler4, fill, img_bits, bg_bits,
               xs, ys, parent, info, dirty, iou, live, order, start, head, tail, nxt)
        for y in range(h):
            filled[y] = fill[(y + 1) * (w + 2) + 1 : (y + 1) * (w + 2) + 1 + w]
        _superlevel(filled, top, needed[i], g, filled_rule, filled_best, filled_largest, n_filled, xs, ys,
                    parent, info, dirty, iou, live, order, start, count)
        nested = False
        for t in range(top):
            if needed[i, t] and euler4[t] // 4 + n_holes[t] != n_filled[t]:
                nested = True
                break
        if nested:
            _superlevel(q[i], top, needed[i], g, outer_rule, outer, unused, n_outer, xs, ys,
                        parent, info, dirty, iou, live, order, start, count)
        else:  # every outer contour is a top-level one: same boxes
            outer[:] = filled_best
        empty = _box_iou(0.0, 0.0, 0.0, 0.0, g, True)
        for t in range(WSOL_LEVELS):
            if not needed[i, t]:
                continue
            if t == top or outer[t] < 0:
                best[i, t] = empty
                largest[i, t] = empty
            else:
                best[i, t] = max(outer[t], holes[t])
                largest[i, t] = filled_largest[t]
    return best, largest


@_jit
def satloc_sweep(levels, n_taus, gt, whole):
    """The SAT box rule at every tau: ``levels`` (n, h, w) ints in 0 .. n_taus
    (foreground at tau k: level > k), ``gt`` (n, G, 4) float64 (x1/y1 exclusive),
    ``whole`` (n,) the IoU of the whole image (the box of an empty foreground).

    Returns (largest, best), each (n, n_taus) float64.
    """
    n, h, w = levels.shape
    m = (h + 2) * (w + 2)
    parent = np.empty(m, np.int32)
    info = np.empty((m, _FIELDS), np.int32)
    dirty = np.empty(m, np.bool_)
    iou = np.empty(m)
    live = np.empty(m, np.int32)
    order = np.empty(m, np.int32)
    start = np.empty(n_taus + 2, np.int64)
    best = np.empty((n, n_taus))
    largest = np.empty((n, n_taus))
    needed = np.ones(n_taus, np.bool_)
    counts = np.empty(n_taus, np.int64)
    rule = np.array([_SATLOC])
    xs, ys = _coordinates(h, w)
    for i in range(n):
        _superlevel(levels[i], n_taus, needed, gt[i], rule, best[i], largest[i], counts, xs, ys,
                    parent, info, dirty, iou, live, order, start, np.empty(0, np.int8))
        for k in range(n_taus):
            if best[i, k] < 0:
                best[i, k] = whole[i]
                largest[i, k] = whole[i]
    return largest, best


@_jit
def normalized_levels(up):
    """``quantised(wsol_score_maps(...))`` from the resized maps ``up`` (n, h, w) float32,
    in one pass per map, with the same float32 operations: ``up - min``, divided by the
    new max, times 255, truncated to uint8; a map with a NaN, or a constant one, gives
    zeros."""
    n, h, w = up.shape
    out = np.zeros((n, h, w), np.uint8)
    scale = np.float32(255.0)
    for i in range(n):
        lo = up[i, 0, 0]
        top = up[i, 0, 0]
        bad = False
        for y in range(h):
            for x in range(w):
                v = up[i, y, x]
                if v != v:
                    bad = True
                lo = min(lo, v)
                top = max(top, v)
        hi = np.float32(top - lo)  # rounding is monotone: the max of (v - lo) is (max - lo)
        if bad or not hi > 0:
            continue
        for y in range(h):
            for x in range(w):
                out[i, y, x] = np.uint8(np.float32(np.float32(up[i, y, x] - lo) / hi) * scale)
    return out
