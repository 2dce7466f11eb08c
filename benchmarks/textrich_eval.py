"""Labelled examples for `vssl curate textrich`, and the OCR scorer's accuracy and speed on them.

    python benchmarks/textrich_eval.py --out /tmp/textrich-labelled --per-class 20

Renders charts (bar / line), tables and documents with PIL, takes photos from
../shared/data/imagenet-samples (the ones listed in TEXT_IN_PHOTO show text themselves and are
labelled light) and the same photos with a drawn sign. Labels: light = the image has readable
text (all but plain photos), heavy = chart / table / document. For each scorer setting
(--max-side, --max-recognize) it reports images/s and the precision / recall of `light` and
`heavy` at the default thresholds, plus a threshold sweep for the chosen setting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vssl.curate import textrich  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-samples"
WORDS = (
    "revenue growth market share quarter report total sales region north south east west "
    "product price cost margin annual budget forecast customer service data analysis result "
    "method table figure section summary introduction results discussion conclusion average "
    "value index rate percent million year month week team project status update review plan"
).split()
FONTS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
]


def font(rng: random.Random, size: int):
    paths = [f for f in FONTS if os.path.exists(f)]
    if paths:
        return ImageFont.truetype(rng.choice(paths), size)
    return ImageFont.load_default(size=size)


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def document(rng: random.Random) -> Image.Image:
    w, h = rng.choice([(600, 800), (800, 600), (700, 900)])
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    size = rng.randint(13, 20)
    y = rng.randint(20, 50)
    d.text((40, y), words(rng, 4).title(), fill=(0, 0, 0), font=font(rng, size + 10))
    y += size + 30
    cols = rng.choice([1, 1, 2])
    colw = (w - 80) // cols
    for c in range(cols):
        yy = y
        while yy < h - 40:
            n = max(2, colw // (size * 4))
            d.text((40 + c * colw, yy), words(rng, n), fill=(20, 20, 20), font=font(rng, size))
            yy += int(size * 1.5)
            if rng.random() < 0.1:
                yy += size
    return img


def table(rng: random.Random) -> Image.Image:
    rows, cols = rng.randint(4, 10), rng.randint(3, 6)
    cw, ch = rng.randint(90, 140), rng.randint(30, 42)
    w, h = cols * cw + 40, rows * ch + 80
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f = font(rng, rng.randint(13, 17))
    d.text((20, 15), words(rng, 3).title(), fill=(0, 0, 0), font=font(rng, 20))
    top = 55
    header = tuple(rng.randint(180, 230) for _ in range(3))
    d.rectangle([20, top, 20 + cols * cw, top + ch], fill=header)
    for r in range(rows + 1):
        d.line([20, top + r * ch, 20 + cols * cw, top + r * ch], fill=(90, 90, 90))
    for c in range(cols + 1):
        d.line([20 + c * cw, top, 20 + c * cw, top + rows * ch], fill=(90, 90, 90))
    for r in range(rows):
        for c in range(cols):
            if r == 0:
                t = rng.choice(WORDS).title()
            elif c == 0:
                t = rng.choice(WORDS)
            else:
                t = f"{rng.uniform(0, 999):.1f}"
            d.text((28 + c * cw, top + r * ch + 8), t, fill=(0, 0, 0), font=f)
    return img


def chart(rng: random.Random) -> Image.Image:
    w, h = rng.choice([(640, 480), (800, 500), (600, 600)])
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f = font(rng, rng.randint(12, 16))
    left, bottom, top, right = 70, h - 60, 60, w - 30
    d.text((left, 20), words(rng, 4).title(), fill=(0, 0, 0), font=font(rng, 20))
    d.line([left, top, left, bottom], fill=(0, 0, 0), width=2)
    d.line([left, bottom, right, bottom], fill=(0, 0, 0), width=2)
    for i in range(6):
        y = bottom - i * (bottom - top) // 5
        d.line([left - 5, y, left, y], fill=(0, 0, 0))
        d.text((left - 45, y - 8), str(i * 20), fill=(0, 0, 0), font=f)
    n = rng.randint(4, 8)
    step = (right - left) // n
    vals = [rng.uniform(0.1, 1.0) for _ in range(n)]
    color = tuple(rng.randint(30, 200) for _ in range(3))
    kind = rng.choice(["bar", "line"])
    pts = []
    for i, v in enumerate(vals):
        x = left + i * step + step // 2
        y = bottom - int(v * (bottom - top))
        if kind == "bar":
            d.rectangle([x - step // 3, y, x + step // 3, bottom], fill=color)
        pts.append((x, y))
        d.text((x - 20, bottom + 8), rng.choice(WORDS)[:6], fill=(0, 0, 0), font=f)
    if kind == "line":
        d.line(pts, fill=color, width=3)
    d.text((right - 150, top), words(rng, 2), fill=color, font=f)
    return img


def photo(rng: random.Random, path: Path) -> Image.Image:
    img = Image.open(path).convert("RGB")
    s = rng.uniform(400, 700) / max(img.size)
    return img.resize((round(img.width * s), round(img.height * s)))


def photo_with_sign(rng: random.Random, path: Path) -> Image.Image:
    img = photo(rng, path)
    d = ImageDraw.Draw(img)
    size = rng.randint(18, 36)
    text = words(rng, rng.randint(1, 3)).upper()
    f = font(rng, size)
    tw = d.textlength(text, font=f)
    x = rng.randint(5, max(6, int(img.width - tw - 30)))
    y = rng.randint(5, max(6, img.height - size * 2 - 10))
    bg = rng.choice([(255, 255, 255), (250, 220, 40), (30, 90, 200), (200, 30, 30), (20, 120, 40)])
    fg = (0, 0, 0) if sum(bg) > 500 else (255, 255, 255)
    d.rectangle([x, y, x + tw + 20, y + size * 1.6], fill=bg)
    d.text((x + 10, y + size * 0.25), text, fill=fg, font=f)
    return img


# The 100 ImageNet samples checked by eye: these show clearly readable text themselves (a
# "photo with text" class: light, not heavy); the AMBIGUOUS ones (small watermarks, brand names,
# jersey numbers, a digital clock) are left out of the labelled set; the rest are plain photos.
TEXT_IN_PHOTO = {
    "n02977058_cash_machine", "n03095699_container_ship", "n03240683_drilling_platform",
    "n03485407_hand-held_computer", "n03642806_laptop", "n04243546_slot", "n04367480_swab",
    "n04562935_water_tower", "n06874185_traffic_light",
}  # fmt: skip
AMBIGUOUS = {
    "n01770081_harvestman", "n01795545_black_grouse", "n02128925_jaguar", "n02526121_eel",
    "n02669723_academic_gown", "n02802426_basketball", "n02823428_beer_bottle", "n03131574_crib",
    "n03196217_digital_clock", "n03297495_espresso_maker", "n03379051_football_helmet",
    "n03424325_gasmask", "n03595614_jersey", "n03717622_manhole_cover", "n03759954_microphone",
    "n03791053_motor_scooter", "n03887697_paper_towel", "n04204238_shopping_basket",
    "n04264628_space_bar", "n04310018_steam_locomotive", "n04336792_stretcher",
    "n04443257_tobacco_shop", "n04540053_volleyball",
}  # fmt: skip


def make_set(out: Path, per_class: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    every = sorted(PHOTOS.glob("*.JPEG"))
    photos = [p for p in every if p.stem not in TEXT_IN_PHOTO | AMBIGUOUS]
    rng.shuffle(photos)
    items = []
    gens = {"document": document, "table": table, "chart": chart}
    for cls, fn in gens.items():
        for i in range(per_class):
            items.append((f"{cls}-{i:03d}", fn(rng), True, True))
    for i in range(per_class):
        p = photos[i % len(photos)]
        items.append((f"photo-{i:03d}", photo(rng, p), False, False))
        q = photos[(i + per_class) % len(photos)]
        items.append((f"sign-{i:03d}", photo_with_sign(rng, q), True, False))
    for p in every:
        if p.stem in TEXT_IN_PHOTO:
            items.append((f"phototext-{p.stem}", photo(rng, p), True, False))
    labels = []
    for name, img, light, heavy in items:
        path = out / f"{name}.jpg"
        img.save(path, quality=rng.randint(75, 95))
        labels.append({"path": str(path), "light": light, "heavy": heavy})
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return labels


def pr(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = float((pred & truth).sum())
    return tp / max(1, pred.sum()), tp / max(1, truth.sum())


def evaluate(labels, max_side: int, max_recognize: int, threads: int, ratio: float) -> dict:
    from vssl.data.decode import open_image

    scorer = textrich.OcrScorer(
        textrich.OcrConfig(
            max_side=max_side, max_recognize=max_recognize, threads=threads, max_crop_ratio=ratio
        )
    )
    scorer(scorer.prepare(open_image(labels[0]["path"])))  # warm-up
    rows = []
    t0 = time.perf_counter()
    for lab in labels:
        img = open_image(lab["path"], draft_size=max_side)
        rows.append(scorer(scorer.prepare(img)))
    secs = time.perf_counter() - t0
    ts = np.array([r["text_score"] for r in rows])
    hs = np.array([r["heavy_score"] for r in rows])
    light = np.array([lab["light"] for lab in labels])
    heavy = np.array([lab["heavy"] for lab in labels])
    lp, lr = pr(ts >= textrich.OCR_LIGHT_THRESHOLD, light)
    hp, hr = pr(hs >= textrich.OCR_HEAVY_THRESHOLD, heavy)
    return {
        "max_side": max_side,
        "max_recognize": max_recognize,
        "img_per_s": len(labels) / secs,
        "light_p": lp,
        "light_r": lr,
        "heavy_p": hp,
        "heavy_r": hr,
        "light_frac": float((ts >= textrich.OCR_LIGHT_THRESHOLD).mean()),
        "heavy_frac": float((hs >= textrich.OCR_HEAVY_THRESHOLD).mean()),
        "text_score": ts.tolist(),
        "heavy_score": hs.tolist(),
        "rows": rows,
    }


def peer(labels) -> dict:
    """rapidocr-onnxruntime used as shipped: RapidOCR() (det + cls + rec, its own resize), a
    readable line = the same confidence / alphanumerics test; and its detector alone (>= 1 box)."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    light = np.array([lab["light"] for lab in labels])
    engine(labels[0]["path"])  # warm-up
    t0 = time.perf_counter()
    found, boxes = [], []
    for lab in labels:
        res, _ = engine(lab["path"])
        res = res or []
        found.append(any(s >= 0.8 and textrich._alnum(t) >= 3 for _, t, s in res))
        boxes.append(len(res))
    secs = time.perf_counter() - t0
    p_full, r_full = pr(np.array(found), light)
    return {"img_per_s": len(labels) / secs, "light_p": p_full, "light_r": r_full}


def det_only(labels, max_side: int) -> dict:
    """Our resize + the detector alone, light = at least one box: what recognition adds."""
    from vssl.data.decode import open_image

    scorer = textrich.OcrScorer(textrich.OcrConfig(max_side=max_side))
    light = np.array([lab["light"] for lab in labels])
    t0 = time.perf_counter()
    pred = []
    for lab in labels:
        rgb = scorer.prepare(open_image(lab["path"], draft_size=max_side))
        b, _ = scorer.det(np.ascontiguousarray(rgb[..., ::-1]))
        pred.append(b is not None and len(b) > 0)
    secs = time.perf_counter() - t0
    p, r = pr(np.array(pred), light)
    plain = np.array([not lab["light"] for lab in labels])
    return {
        "img_per_s": len(labels) / secs,
        "light_p": p,
        "light_r": r,
        "plain_photos_with_a_box": float(np.array(pred)[plain].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/textrich-labelled")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument(
        "--settings",
        default="480:8,480:8:1000,320:8,640:8,480:4",
        help="max_side:max_recognize[:max_crop_ratio], comma-separated",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="0: the set the thresholds were set on")
    ap.add_argument("--json", help="write all scores here")
    ap.add_argument("--peer", action="store_true", help="also time RapidOCR() as shipped")
    args = ap.parse_args()
    labels = make_set(Path(args.out), args.per_class, seed=args.seed)
    print(f"{len(labels)} labelled images in {args.out}; load {os.getloadavg()[0]:.1f}")
    results = []
    for s in args.settings.split(","):
        side, rec, *ratio = s.split(":")  # max_side:max_recognize[:max_crop_ratio]
        ratio = float(ratio[0]) if ratio else textrich.OcrConfig.max_crop_ratio
        side, rec = int(side), int(rec)
        r = evaluate(labels, side, rec, args.threads, ratio)
        results.append(r)
        print(
            f"max_side {side:4d} max_recognize {rec:3d} crop ratio {ratio:g}: "
            f"{r['img_per_s']:.2f} img/s  "
            f"light P {r['light_p']:.2f} R {r['light_r']:.2f} ({100 * r['light_frac']:.0f}%)  "
            f"heavy P {r['heavy_p']:.2f} R {r['heavy_r']:.2f} ({100 * r['heavy_frac']:.0f}%)  "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    if args.peer:
        r = det_only(labels, 480)
        print(
            f"detector only, max_side 480, light = >= 1 box: {r['img_per_s']:.2f} img/s  light P "
            f"{r['light_p']:.2f} R {r['light_r']:.2f}; plain photos with a box: "
            f"{100 * r['plain_photos_with_a_box']:.0f}%  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        r = peer(labels)
        print(
            f"peer: RapidOCR() as shipped (det+cls+rec, 736 px short side): {r['img_per_s']:.2f} "
            f"img/s  light P {r['light_p']:.2f} R {r['light_r']:.2f}  load "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"labels": labels, "results": results}, default=float)
        )


if __name__ == "__main__":
    main()
