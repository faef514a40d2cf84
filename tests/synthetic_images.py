"""Pictures like the cookbook's examples, drawn with Pillow (no files, no downloads)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def bar_chart() -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.text((90, 8), "Sales by quarter", fill="black")
    draw.line((30, 210, 300, 210), fill="black")
    draw.line((30, 30, 30, 210), fill="black")
    for index, value in enumerate((60, 120, 90, 160)):
        left = 50 + index * 62
        draw.rectangle(
            (left, 210 - value, left + 40, 210), fill=("#4472c4", "#ed7d31", "#a5a5a5", "#ffc000")[index]
        )
        draw.text((left + 8, 215), f"Q{index + 1}", fill="black")
    return image


def book_cover() -> Image.Image:
    image = Image.new("RGB", (200, 300), "#1d2b3a")
    draw = ImageDraw.Draw(image)
    draw.text((78, 100), "ALONE", fill="white")
    draw.text((55, 250), "Morgan Maxwell", fill="#e0c080")
    return image


def team_photo(shirt: str, people: int) -> Image.Image:
    image = Image.new("RGB", (320, 200), "#7cb342")
    draw = ImageDraw.Draw(image)
    for index in range(people):
        x = 30 + index * 55
        draw.ellipse((x, 40, x + 30, 70), fill="#f1c27d")
        draw.rectangle((x - 5, 72, x + 35, 150), fill=shirt)
    return image


def save_all(directory: Path) -> dict[str, Path]:
    pictures = {
        "chart.png": bar_chart(),
        "cover.jpg": book_cover(),
        "team1.jpg": team_photo("#d32f2f", 5),
        "team2.jpg": team_photo("#1976d2", 4),
    }
    paths = {}
    for name, picture in pictures.items():
        paths[name] = directory / name
        picture.save(paths[name])
    return paths
