"""The Dataset tab: pick a source, preview it, make it the training set, export it.

Layout and event wiring live in ``build_dataset_tab``; the work is done by plain
functions (``build_config``, ``preview_dataset``, ``size_report``, ``save_upload``,
``export_dataset``...) that take and return plain values, so tests call them
without Gradio running. The images themselves are read by ``studio.data``.

A successful load hands the dataset to Train and Fine-tune through
``ctx.dataset.set(DatasetChoice(...))``; the page opens with the current choice
(the bundled emoji set's smileys on a fresh start) already previewed.
"""

from __future__ import annotations

import logging
import re
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from studio.config.data import DATA_SOURCES, EMOJI_CATEGORIES, STARTING_CATEGORY, DataConfig
from studio.context import DatasetChoice, StudioContext
from studio.data import ImageDataset, SkippedFile, load_image_dataset, unpack_upload
from studio.paths import confine
from studio.uploads import unpack_limit
from studio.errors import StudioError, describe_exception

log = logging.getLogger(__name__)

#: How many images the preview gallery shows.
PREVIEW_COUNT = 24
#: Longest side of a preview thumbnail, in pixels.
PREVIEW_SIDE = 256
#: Labels of the sources in the radio, in DATA_SOURCES order.
SOURCE_LABELS = {
    "emoji": "Bundled emoji set",
    "folder": "Local folder",
    "upload": "Upload files or a .zip",
    "hub": "Hugging Face dataset",
}
#: Shorter-side buckets of the size histogram: (label, lowest side in pixels).
SIZE_BUCKETS = (("< 64", 0), ("64-127", 64), ("128-255", 128), ("256-511", 256),
                ("512-1023", 512), ("1024-2047", 1024), (">= 2048", 2048))
#: What the upload box accepts (images, caption files, zip archives).
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                ".zip", ".txt", ".caption", ".jsonl", ".csv"]
AUTO = ("auto", "")
#: The emoji category dropdown: the whole set (value "") first, then each category with its size.
CATEGORY_CHOICES = [(f"All {sum(EMOJI_CATEGORIES.values()):,} emoji", "")] + \
    [(f"{name} ({count})", name) for name, count in EMOJI_CATEGORIES.items()]
#: The info line under the emoji category dropdown.
CATEGORY_INFO = (f"The smileys ({EMOJI_CATEGORIES[STARTING_CATEGORY]} faces and hearts) show round yellow faces "
                 "after about 5 minutes of training on a CPU; the whole set needs far longer (on a 2-core CPU, "
                 "still no recognisable emoji after an hour).")


@dataclass
class DatasetView:
    """Everything the tab shows after a load, as plain values.

    Attributes:
        dataset: The loaded dataset.
        gallery: (image, caption) pairs of the first images.
        counts: Markdown line with the numbers.
        sizes: Markdown size distribution.
        skipped: Rows [file, reason] of skipped files.
        status: One-line status for the status box.
        splits, image_columns, caption_columns: choices for the dropdowns.
        choice: What goes to ``ctx.dataset.set`` for the training tabs.
    """

    dataset: ImageDataset
    gallery: list[tuple[Any, str]]
    counts: str
    sizes: str
    skipped: list[list[str]]
    status: str
    splits: list[str] = field(default_factory=list)
    image_columns: list[str] = field(default_factory=list)
    caption_columns: list[str] = field(default_factory=list)
    choice: DatasetChoice | None = None


def build_config(source: str, folder: str = "", upload_dir: str = "", hub_id: str = "", split: str = "",
                 image_column: str = "", caption_column: str = "", max_rows: float | int | None = 0,
                 require_captions: bool = False, category: str = "") -> DataConfig:
    """Widget values -> a validated ``DataConfig`` (``category`` is kept for the bundled emoji set only).

    Raises:
        ConfigError: when the source's path or id is missing or a value is invalid.
    """
    path = {"folder": folder, "upload": upload_dir}.get(source, "")
    return DataConfig(
        source=source,
        path=(path or "").strip(),
        hub_id=(hub_id or "").strip() if source == "hub" else "",
        split=(split or "").strip() if source == "hub" else "",
        image_column=(image_column or "").strip() if source == "hub" else "",
        caption_column=(caption_column or "").strip(),
        max_rows=int(max_rows or 0),
        require_captions=bool(require_captions),
        category=(category or "") if source == "emoji" else "",
    )


def size_report(sizes: list[tuple[int, int]]) -> str:
    """Markdown: min / median / max width and height, and a histogram of the shorter side."""
    if not sizes:
        return "No images."
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]

    def stats(values: list[int]) -> str:
        return f"{min(values)} / {statistics.median(values):g} / {max(values)}"

    counts = [0] * len(SIZE_BUCKETS)
    for w, h in sizes:
        side = min(w, h)
        index = max(i for i, (_, low) in enumerate(SIZE_BUCKETS) if side >= low)
        counts[index] += 1
    top = max(counts)
    lines = ["| | min / median / max |", "|---|---|",
             f"| width | {stats(widths)} px |", f"| height | {stats(heights)} px |", "",
             "| shorter side | images | |", "|---|---:|---|"]
    for (label, _), count in zip(SIZE_BUCKETS, counts):
        if count:
            bar = "█" * max(1, round(20 * count / top))
            lines.append(f"| {label} px | {count} | {bar} |")
    return "\n".join(lines)


def skipped_table(skipped: list[SkippedFile]) -> list[list[str]]:
    """Rows [file, reason] for the skipped-files table."""
    return [[s.name, s.reason] for s in skipped]


def counts_line(ds: ImageDataset) -> str:
    """Markdown: images, captioned images, skipped files, source."""
    captioned = sum(1 for c in ds.captions if c.strip()) if ds.captions is not None else 0
    where = f" (from {ds.info.caption_source})" if ds.info.caption_source else ""
    credit = " · graphics: Twemoji by Twitter, Inc and contributors, CC-BY 4.0" if ds.config.source == "emoji" else ""
    return (f"**{len(ds)}** images · **{captioned}** with captions{where} · "
            f"**{len(ds.skipped)}** skipped · source: {ds.config.label}{credit}")


def preview_dataset(cfg: DataConfig, *, preview_count: int = PREVIEW_COUNT,
                    progress: Callable[[float, str], None] | None = None,
                    workspace: Path | None = None) -> DatasetView:
    """Load ``cfg`` and build everything the tab shows (a local .zip unpacks into the workspace's cache).

    Raises:
        StudioError: when the source cannot be read (a ``DataError`` with the reason).
    """
    ds = load_image_dataset(cfg, progress=progress, scratch=Path(workspace) / ".cache" if workspace else None)
    gallery = []
    for i in range(min(preview_count, len(ds))):
        caption = ds.captions[i] if ds.captions is not None else ""
        image = ds.image(i)
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))  # the page needs thumbnails, not 12 MP photos
        gallery.append((image, caption or ds.names[i]))
    summary = ds.summary()
    choice = DatasetChoice(cfg, summary, len(ds), ds.has_captions)
    status = (f"Loaded {summary}. This is now the training dataset for the Train and Fine-tune tabs.")
    return DatasetView(dataset=ds, gallery=gallery, counts=counts_line(ds), sizes=size_report(ds.sizes()),
                       skipped=skipped_table(ds.skipped), status=status, splits=list(ds.info.splits),
                       image_columns=list(ds.info.image_columns or ds.info.columns),
                       caption_columns=list(ds.info.caption_columns), choice=choice)


def save_upload(files: list[Any] | None, workspace: Path, max_bytes: int | None = None,
                left_out: list[str] | None = None) -> str:
    """Unpack uploaded files (images, caption files, .zip) into ``<workspace>/uploads/<id>``.

    Args:
        max_bytes: Most bytes the upload may unpack to (``unpack_limit(--max-file-size)``).
        left_out: Receives the files left out because they are not images or captions.

    Returns:
        The folder, for ``DataConfig(source="upload", path=...)``.

    Raises:
        DataError: when nothing was uploaded or a zip is unsafe, damaged or too big.
    """
    paths = [_file_path(f) for f in (files or [])]
    upload_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    limit = {} if max_bytes is None else {"max_bytes": max_bytes}
    return str(unpack_upload([p for p in paths if p], Path(workspace) / "uploads" / upload_id, left_out=left_out,
                             **limit))


def _file_path(value: Any) -> str:
    """A path from whatever gr.File gives (a path string, a dict, a file object)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or value.get("name") or ""
    return getattr(value, "path", None) or getattr(value, "name", None) or ""


def default_export_dir(workspace: Path, cfg: DataConfig) -> Path:
    """``<workspace>/exports/<source-name>-<time>``: a new folder for an export."""
    name = {"emoji": "emoji", "hub": cfg.hub_id.split("/")[-1]}.get(cfg.source, Path(cfg.path).name or cfg.source)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"
    return Path(workspace) / "exports" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_export_dir(target: str, workspace: Path, cfg: DataConfig) -> Path:
    """The export folder: the default when empty; a relative path is taken inside the workspace.

    Raises:
        ConfigError: when the folder (``..`` and links followed) is outside the workspace.
    """
    target = (target or "").strip()
    if not target:
        return default_export_dir(workspace, cfg)
    return confine(target, workspace, "The export folder")


def export_dataset(cfg: DataConfig, target: str, workspace: Path,
                   progress: Callable[[float, str], None] | None = None) -> str:
    """Export the dataset of ``cfg`` as PNGs + metadata.jsonl; returns the status line.

    Raises:
        StudioError: when the source cannot be read or the folder cannot be written.
    """
    from studio.data import export_image_folder

    out = resolve_export_dir(target, workspace, cfg)
    ds = load_image_dataset(cfg, progress=(lambda f, m: progress(0.3 * f, m)) if progress else None,
                            scratch=Path(workspace) / ".cache")
    export_image_folder(ds, out, progress=(lambda f, m: progress(0.3 + 0.7 * f, m)) if progress else None)
    caps = " with metadata.jsonl captions" if ds.captions is not None else " with metadata.jsonl (no captions)"
    return f"Exported {len(ds)} images to {out}{caps}."


def input_values(cfg: DataConfig) -> list[Any]:
    """The tab's input widget values that rebuild ``cfg`` (inverse of ``build_config``).

    For a source other than the emoji set the (hidden) category is the starting one, so switching
    back to the emoji set offers the smileys again, not the whole set.
    """
    return [cfg.source, cfg.path if cfg.source == "folder" else "", cfg.path if cfg.source == "upload" else "",
            cfg.hub_id, cfg.split, cfg.image_column, cfg.caption_column, cfg.max_rows, cfg.require_captions,
            cfg.category if cfg.source == "emoji" else STARTING_CATEGORY]


def source_visibility(source: str) -> tuple[bool, bool, bool, bool]:
    """Which input groups (folder, upload, hub, emoji category) show for ``source``."""
    return source == "folder", source == "upload", source == "hub", source == "emoji"


def _dropdown_choices(values: list[str]) -> list[tuple[str, str]]:
    return [AUTO] + [(v, v) for v in values]


# --------------------------------------------------------------------------- layout and events


def build_dataset_tab(ctx: StudioContext) -> dict:
    """Lay out the Dataset tab and wire its events.

    Returns:
        {"status": the status box} (other tabs may show it).
    """
    workspace = ctx.workspace
    current = ctx.dataset.get().config
    gr.Markdown("Pick the images to train on. The set you **Load** becomes the training dataset "
                "of the Train and Fine-tune tabs.", elem_id="dataset-intro")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            source = gr.Radio([(SOURCE_LABELS[s], s) for s in DATA_SOURCES], value=current.source,
                              label="Source", info=DataConfig.help_for("source"), elem_id="dataset-source")
            fv, uv, hv, ev = source_visibility(current.source)
            with gr.Group(visible=ev) as emoji_box:
                category = gr.Dropdown(CATEGORY_CHOICES, value=current.category, label="Emoji category",
                                       info=CATEGORY_INFO, elem_id="dataset-category")
            with gr.Group(visible=fv) as folder_box:
                folder = gr.Textbox(label="Folder path", value=current.path if current.source == "folder" else "",
                                    placeholder="/data/my-images", elem_id="dataset-folder",
                                    info="Images are found in subfolders too; captions from metadata.jsonl "
                                         "(file_name, text) or a .txt file beside each image.")
            with gr.Group(visible=uv) as upload_box:
                upload = gr.File(label="Images, caption files or a .zip", file_count="multiple",
                                 file_types=UPLOAD_TYPES, elem_id="dataset-upload")
                upload_dir = gr.Textbox(label="Unpacked to", interactive=False, elem_id="dataset-upload-dir",
                                        value=current.path if current.source == "upload" else "")
            with gr.Group(visible=hv) as hub_box:
                hub_id = gr.Textbox(label="Dataset id", value=current.hub_id, elem_id="dataset-hub-id",
                                    placeholder="huggan/smithsonian_butterflies_subset",
                                    info="A Hugging Face dataset id (cached ones work offline) or a local dataset folder.")
                split = gr.Dropdown(_dropdown_choices([current.split] if current.split else []),
                                    value=current.split, label="Split", allow_custom_value=True,
                                    elem_id="dataset-split", info="auto picks 'train' or the first split.")
                image_column = gr.Dropdown(_dropdown_choices([]), value=current.image_column, label="Image column",
                                           allow_custom_value=True, elem_id="dataset-image-column")
            caption_column = gr.Dropdown(_dropdown_choices([]), value=current.caption_column, label="Caption column",
                                         allow_custom_value=True, elem_id="dataset-caption-column",
                                         info="auto finds text/caption/prompt columns.")
            with gr.Row():
                max_rows = gr.Number(value=current.max_rows, precision=0, minimum=0, label="Row limit (0 = all)",
                                     elem_id="dataset-max-rows")
                require_captions = gr.Checkbox(value=current.require_captions, label="Require captions",
                                               info=DataConfig.help_for("require_captions"),
                                               elem_id="dataset-require-captions")
            load_button = gr.Button("Load", variant="primary", elem_id="dataset-load")
            status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="dataset-status",
                                elem_classes=["studio-status"])
        with gr.Column(scale=2):
            gallery = gr.Gallery(label=f"Preview (first {PREVIEW_COUNT})", columns=6, height="auto",
                                 object_fit="scale-down", elem_id="dataset-gallery", show_label=True)
            counts = gr.Markdown(elem_id="dataset-counts")
            with gr.Accordion("Image sizes", open=False):
                sizes = gr.Markdown(elem_id="dataset-sizes")
            skipped = gr.Dataframe(headers=["file", "reason"], value=[], label="Skipped files",
                                   interactive=False, wrap=True, elem_id="dataset-skipped")
            with gr.Accordion("Export as image folder", open=False):
                export_dir = gr.Textbox(label="Target folder", elem_id="dataset-export-dir",
                                        placeholder=f"empty = {workspace / 'exports'}/<name>-<time>",
                                        info="Writes <split>_<index>.png and metadata.jsonl (file_name, text). "
                                             "It must be inside the workspace; a relative path is taken inside it.")
                export_button = gr.Button("Export as image folder", elem_id="dataset-export")
                export_status = gr.Textbox(label="Export", interactive=False, elem_id="dataset-export-status")
    loaded_config = gr.State(None)  # the DataConfig (as a dict) of the last successful load

    config_inputs = [source, folder, upload_dir, hub_id, split, image_column, caption_column,
                     max_rows, require_captions, category]
    view_outputs = [gallery, counts, sizes, skipped, status, split, image_column, caption_column, loaded_config]

    def render(cfg: DataConfig, progress: gr.Progress) -> tuple:
        view = preview_dataset(cfg, progress=lambda f, m: progress(f, desc=m), workspace=workspace)
        ctx.dataset.set(view.choice)
        return (view.gallery, view.counts, view.sizes, view.skipped, view.status,
                gr.update(choices=_dropdown_choices(view.splits)),
                gr.update(choices=_dropdown_choices(view.image_columns)),
                gr.update(choices=_dropdown_choices(view.caption_columns)),
                cfg.to_dict())

    def failed(exc: Exception) -> tuple:
        message = describe_exception(exc)
        if not isinstance(exc, StudioError):
            log.exception("Dataset load failed")
        gr.Warning(message)
        still = ctx.dataset.get().summary
        return ([], "", "", [], f"Not loaded: {message}\nThe training dataset is still: {still}.",
                gr.update(), gr.update(), gr.update(), gr.update())

    def on_load(*values: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        try:
            return render(build_config(*values), progress)
        except Exception as exc:  # noqa: BLE001 - shown as a message, never a traceback
            return failed(exc)

    def on_page_load(progress: gr.Progress = gr.Progress()) -> tuple:
        # A reloaded page shows the current training dataset, with the inputs that made it.
        cfg = ctx.dataset.get().config
        inputs = tuple(input_values(cfg)) + tuple(gr.update(visible=v) for v in source_visibility(cfg.source))
        try:
            return render(cfg, progress) + inputs
        except Exception as exc:  # noqa: BLE001
            return failed(exc) + inputs

    def on_upload(files: list[Any] | None) -> tuple[str, str]:
        try:
            left_out: list[str] = []
            folder_path = save_upload(files, workspace, unpack_limit(ctx.settings.max_file_size), left_out)
        except Exception as exc:  # noqa: BLE001
            message = describe_exception(exc)
            gr.Warning(message)
            return "", f"Upload failed: {message}"
        dropped = (f" Left out {len(left_out)} file(s) that are not images or captions: "
                   f"{', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}." if left_out else "")
        return folder_path, f"Uploaded to {folder_path}.{dropped} Press Load to check and preview the images."

    def on_export(state: dict | None, target: str, progress: gr.Progress = gr.Progress()) -> str:
        try:
            cfg = DataConfig.from_dict(state) if state else ctx.dataset.get().config
            return export_dataset(cfg, target, workspace, progress=lambda f, m: progress(f, desc=m))
        except Exception as exc:  # noqa: BLE001
            message = describe_exception(exc)
            if not isinstance(exc, StudioError):
                log.exception("Dataset export failed")
            gr.Warning(message)
            return f"Export failed: {message}"

    source.change(lambda s: tuple(gr.update(visible=v) for v in source_visibility(s)), inputs=source,
                  outputs=[folder_box, upload_box, hub_box, emoji_box], api_name="choose_source", queue=False)
    upload.upload(on_upload, inputs=upload, outputs=[upload_dir, status], api_name="upload_files")
    # progress (and a failure) shows on the status box only, not as a frozen bar on every output
    load_button.click(on_load, inputs=config_inputs, outputs=view_outputs, api_name="load_dataset",
                      show_progress_on=status)
    export_button.click(on_export, inputs=[loaded_config, export_dir], outputs=export_status,
                        api_name="export_dataset")
    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_page_load, outputs=view_outputs + config_inputs + [folder_box, upload_box, hub_box, emoji_box],
                  api_name="preview_current_dataset", show_progress_on=status)
    hub_id.input(lambda: ("", ""), outputs=[split, image_column], api_name="reset_hub_columns", queue=False)
    return {"status": status, "gallery": gallery}


__all__ = ["CATEGORY_CHOICES", "DatasetView", "build_config", "preview_dataset", "size_report", "skipped_table", "counts_line",
           "save_upload", "export_dataset", "default_export_dir", "resolve_export_dir", "source_visibility", "input_values",
           "build_dataset_tab"]
