"""Everything `k5 serve` asks of the engine, behind one small interface.

    engine = Engine.prepare(flags, jobs_dir)    # the generate command's model/layout flags, checked as the CLI checks
                                                # them (exit 2 material: ValueError), before any weight loads
    spec = engine.check(fields, ...)            # one request, by the CLI's rules; ValueError with the CLI's message
    engine.load(sup)                            # every rank, once: the runtime of the parallel layout
    done = engine.run(spec, job_dir, sup, on_step, should_stop)   # every rank of the item group

It runs on the engine every front-end uses (k5.launch.engine.Engine: loaded once, one request after another, with
on_step and should_stop agreed over the item group) and on the CLI's pieces around it (k5.launch.generate: parse_args,
validate; the job loop k5.launch.job.run_items with its checked writing; k5.launch.batch.JobFolder's manifest as the
Destination; k5.launch.metrics' summary), reused, not copied: a job runs as a one-item batch job into its own folder,
so it gets the CLI's checks, files, manifest record and metrics document.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

# Cancelled: every rank of the item group agreed at a step boundary that the job was cancelled (DELETE).
from k5.launch.engine import Cancelled  # noqa: F401 - k5.serve.ranks catches it from here

PLACEHOLDER = "(k5 serve: the request defaults)"
# torch.compile keeps a compiled variant for this many distinct request shapes; more fall back to eager blocks
SHAPES = 8
FIELDS = ("prompt", "negative_prompt", "seed", "height", "width", "num_frames", "steps", "guidance_scale", "shift")




@dataclass
class Done:
    """What the group's leader reports for a finished job."""

    files: dict  # kind -> {name, bytes, sha256, checked}, as the manifest record has them
    record: dict  # the manifest record
    metrics: dict  # the item's metrics (k5.launch.metrics per_item: step_s, dit_forwards, total_s, ...)


class Engine:
    def __init__(self, gargs, env, job, edits: bool):
        from k5.engine.checkpoints.lora import AdapterOpener

        self.gargs, self.env, self.job, self.edits = gargs, env, job, edits
        self.image = job.image  # an Image Lite checkpoint: requests are images
        self.model_id = job.settings["model"]
        self.variant = job.resolved.variant.name if job.resolved.variant else None
        self.open_adapter = AdapterOpener(job.cfg)
        self.rt = self.sup = None

    # ---- before any weight loads ------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, flags: list[str], jobs_dir: Path) -> "Engine":
        """``flags``: the generate command's model, layout and default-request flags. Everything `k5 generate`
        checks before loading is checked here (it runs that very code on a placeholder request into ``jobs_dir``);
        raises ValueError / OSError with its message. An edit-capable Image Lite server (an I2I checkpoint, or
        ``--model tiny-image`` unless ``--task t2i``) and a ``--task i2v`` server are checked with a placeholder
        image, as their requests bring one."""
        from k5.launch import generate

        def parse(extra):
            return generate.parse_args([*flags, *extra, "--prompt", PLACEHOLDER, "--output-dir", str(jobs_dir)])

        gargs = parse([])
        edits = serves_edits(gargs)
        with tempfile.TemporaryDirectory(prefix="k5-serve-") as scratch:
            if edits or gargs.task == "i2v":
                from PIL import Image

                probe = Path(scratch) / "probe.png"
                Image.new("RGB", (64, 64), (128, 128, 128)).save(probe)
                gargs = parse(["--image", str(probe)] + ([] if gargs.task else ["--task", "i2i"]))
            env = generate.detect_env(gargs)
            job = generate.validate(gargs, env)
            env.estimate = generate.check_memory(gargs, env, job)
        return cls(gargs, env, job, edits)

    @property
    def world(self) -> int:
        return self.env.world

    @property
    def rank(self) -> int:
        return self.env.rank

    def names(self) -> set[str]:
        """What a request's ``model`` may say to mean this server's model."""
        return {n for n in (self.model_id, self.gargs.model, self.variant, "k5") if n}

    def request_defaults(self, variant: str | None) -> tuple[dict, object]:
        """(a request's defaults, the resolved checkpoint with the request's variant): the server's flags, then the
        variant's sampling settings when a request names one (a tiny model takes any variant of its task for those,
        as the CLI's --variant does; a real checkpoint only its own)."""
        g, resolved = self.gargs, self.job.resolved
        defaults = dict(negative_prompt=g.negative_prompt, height=g.height, width=g.width, num_frames=g.num_frames,
                        steps=g.steps, guidance_scale=g.guidance_scale, shift=g.shift, seed=g.seed, image=None)
        if self.image:
            defaults.pop("num_frames")
        if variant is not None and variant != self.variant:
            if resolved.kind != "tiny":
                raise ValueError(f"'variant' {variant}: this server runs {self.variant or self.model_id}; another "
                                 f"variant is another checkpoint (start a server with --model for it), or leave "
                                 f"'variant' out")
            from k5.engine.catalogue.resolve import TINY_MODELS, tiny_variant

            chosen = tiny_variant(variant, TINY_MODELS[resolved.model][1], f"the tiny model --model {resolved.model}")
            defaults.update(chosen.sampling())
            resolved = replace(resolved, variant=chosen, variant_from="request")
        return {k: v for k, v in defaults.items() if v is not None or k == "image"}, resolved

    def check(self, fields: dict, *, from_text: bool, image: str | None = None, loras: tuple | None = None,
              variant: str | None = None, magcache: bool | None = None, task: str | None = None,
              output: str) -> dict:
        """One request checked as a prompt-file line is (k5.launch.prompts: each field's type, finite numbers, then
        the checkpoint's rules: sizes, 4k+1 frames, the image, the layout); returns the spec every rank runs.

        ``fields``: prompt-file fields (FIELDS), strings when ``from_text`` (a multipart form); ``image``: the saved
        upload (I2V, or the source of an edit); ``loras``: (path, scale) pairs inside the server's LoRA folder
        (None: the server's --lora; empty: none); ``task``: t2i or i2i for an image server; ``output``: the file
        name in the job's folder."""
        from k5.engine.pipelines.image_request import resolve as resolve_image
        from k5.engine.pipelines.video import check_request, frame_size
        from k5.launch import images, model as model_flags
        from k5.launch.outputs import media_kind
        from k5.launch.prompts import _item as prompt_line  # one prompt-file line: coercion, defaults, checks
        from k5.parallel.plan import check_request as check_layout

        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
        defaults, resolved = self.request_defaults(variant)
        magcache = self.gargs.magcache if magcache is None else magcache
        if magcache and self.image:
            raise ValueError("'magcache': MagCache skips steps with ratios calibrated per checkpoint, and the "
                             "reference has none for Image Lite; leave 'magcache' out")
        ratios = model_flags.magcache_ratios(argparse_ns(magcache=magcache, model=self.gargs.model), resolved)
        job, cfg, nabla = self.job, self.job.cfg, self.job.nabla

        def check(req):  # what validate() checks of every item (its `check`), with this server's checkpoint
            if self.image:
                req = resolve_image(req, cfg)
            elif job.k6:  # Kandinsky 6: its request rules, PiFlow's guidance 1, the SR tiles (k5.launch.k6)
                from k5.engine.pipelines.k6 import check_request as check_k6_request, check_schedule
                from k5.launch.k6 import check_upscale

                check_k6_request(req, cfg, nabla)
                check_schedule(job.root, req.guidance_scale)
                if job.sr_root is not None:
                    check_upscale(job.sr_root, req, job.upscale)
            else:
                check_request(req, cfg, nabla)
                images.check_video_task(self.gargs.task, req)
            check_layout(job.dims, req.guidance_scale)
            return req

        if self.image:
            defaults["task"] = task
            if task == "i2i" and not self.edits:
                raise ValueError("this server's checkpoint makes images from text (t2i) and cannot edit; use POST "
                                 "/v1/images/generations, or a server started on an I2I checkpoint")
        row = {k: v for k, v in fields.items() if v is not None}
        if image is not None:
            row["image"] = str(image)
        row["output"] = output
        adapters = job.adapters if loras is None else \
            tuple(self.open_adapter(f"{path}:{scale}", None, "'lora'") for path, scale in loras)
        item = prompt_line(row, 0, 0, "request", Path("/"), defaults, check, from_text, adapters, None,
                           images.image_request if self.image else _video_request, media_kind(output))
        req = item.request
        # Kandinsky 6 takes the size as asked (an I2AV image is cropped to it)
        height, width = (req.height, req.width) if self.image or job.k6 else frame_size(req, nabla)
        return {"type": "image" if self.image else "video", "request": dataclasses.asdict(req),
                "output": item.output, "lora": [[str(a.path), a.scale] for a in item.adapters],
                "variant": resolved.variant.name if resolved.variant else None, "magcache": ratios is not None,
                "size": f"{width}x{height}", "frames": 1 if self.image else req.num_frames}

    def _item(self, spec: dict, name: str):
        from k5.engine.pipelines.image_request import ImageRequest
        from k5.engine.pipelines.video import Request
        from k5.launch.prompts import Item

        req = (ImageRequest if spec["type"] == "image" else Request)(**spec["request"])
        adapters = tuple(self.open_adapter(f"{path}:{scale}", None, "'lora'") for path, scale in spec["lora"])
        return Item(0, 0, f"request {name}", req, spec["output"], adapters)

    def _job(self, spec: dict, job_dir: Path, item):
        """The CLI's Job for one request: its item, its folder (a JobFolder: manifest, checked files), its variant
        and MagCache setting."""
        from k5.launch import model as model_flags
        from k5.launch.batch import JobFolder

        _, resolved = self.request_defaults(spec["variant"])
        ratios = resolved.mag_ratios if spec["magcache"] else None
        settings = {**self.job.settings, "variant": spec["variant"], "step_cache": "magcache" if ratios else None}
        return replace(self.job, items=[item], settings=settings, ratios=ratios,
                       checkpoint=model_flags.describe(resolved, ratios),
                       dest=JobFolder(job_dir, settings, "checksum"))

    def finished(self, spec: dict, job_dir: Path, name: str) -> dict | None:
        """Rank 0, before any rank runs (a restart): the manifest record of a job that finished before the server
        ended (its files verified), else None, with whatever the run left behind deleted (temporary files, a file
        published without a record): the CLI's resume rules (k5.launch.batch.prepare)."""
        from k5.launch.batch import MANIFEST, read_manifest

        item = self._item(spec, name)
        dest = self._job(spec, job_dir, item).dest
        job_dir.mkdir(parents=True, exist_ok=True)  # a run killed before it made its folder left none
        try:
            plan = dest.start([item])
        finally:
            dest.close()
        if plan.pending:
            return None
        return [r for r in read_manifest(job_dir / MANIFEST).records if r.get("output") == item.output][-1]

    # ---- loaded, on every rank --------------------------------------------------------------------------------

    def load(self, sup) -> None:
        """Build the runtime once (the CLI's build_runtime, text encoders kept between requests) and join its item
        group; ``sup``: this rank's k5.launch.supervisor.Supervisor."""
        from k5.launch.engine import Engine, EngineOptions

        self.sup = sup
        rt = self.rt = Engine.load(self.job, self.env, EngineOptions.from_args(self.gargs), keep_text=True)
        if self.gargs.compile:
            from k5.engine.compile import allow_variants

            allow_variants(SHAPES, rt.dims.ring)
        rt.join(sup)

    @property
    def describe(self) -> str:
        return self.rt.describe if self.rt is not None else ""

    @property
    def groups(self) -> int:
        """Data-parallel groups: each serves its own request."""
        return self.job.dims.dp

    @property
    def group(self) -> int:
        return self.rt.dp_rank

    @property
    def leader(self) -> bool:
        """This rank writes its group's files and reports its jobs."""
        return self.rt.leader

    def peak_memory(self) -> dict:
        from k5.launch.metrics import peak_memory

        return peak_memory(self.env.device)

    def run(self, spec: dict, job_dir: Path, name: str, on_step: Callable[[int, int], None],
            should_stop: Callable[[], bool]) -> Done | None:
        """Run one job on every rank of this item group; the leader returns Done, the others None.

        ``on_step(done, total)`` after each denoising step (``total``: the steps plus one for the decode);
        ``should_stop()`` is asked on every rank after each step and the group agrees (in the supervisor's stop
        agreement, k5.launch.engine): when any rank says yes, every rank raises Cancelled at that same step. A stop
        (SIGTERM, here or on any rank) raises k5.launch.signals.Stopped on every rank of the group; nothing of the
        job is published then."""
        from k5.launch.job import record_base, run_items
        from k5.launch.signals import Stopped

        rt, sup = self.rt, self.sup
        item = self._item(spec, name)
        job = self._job(spec, job_dir, item)
        rt.ratios = job.ratios  # the step chain of this request: MagCache or nothing
        if self.leader:
            job_dir.mkdir(parents=True, exist_ok=True)

        def step(it, done: int, total: int) -> None:
            if done <= item.request.steps:  # the denoising steps; the job is complete once its files are published
                on_step(done, total)

        records: list[dict] = []
        t0 = time.perf_counter()
        finished, stopped = run_items([item], rt, sup, job.dest, record_base(job, rt), job.settings, True,
                                      expand=self.job.expand, on_step=step, should_stop=should_stop,
                                      on_item=lambda it, record: records.append(record))
        if stopped:
            raise Stopped()
        if not self.leader:
            return None
        if not finished:  # an error while stopping discarded the item (k5.launch.job.run_items)
            raise Stopped()
        self._write_metrics(job, job_dir, finished, time.perf_counter() - t0)
        return Done(records[0]["files"], records[0], finished[0])

    def _write_metrics(self, job, job_dir: Path, finished: list[dict], wall_s: float) -> None:
        """The job's metrics.json: the CLI's summary document for a one-item run, from the leader's report."""
        from k5.launch.batch import METRICS
        from k5.launch.metrics import rank_report, summary, write_json
        from k5.launch.supervisor import Outcome

        dims = self.rt.dims
        report = rank_report(self.rank, self.env.device, self.rt, None, finished)
        files = finished[0]["files"] + [str(job_dir / METRICS)]
        doc = summary(args=self.gargs, job=job, layout={"world": dims.world_size, **dims.degrees},
                      plan={"pending": [0], "finished": 0}, outcome=Outcome(1, None, [report]), status="done",
                      exit_code=0, wall_s=wall_s, files=files)
        write_json(job_dir / METRICS, doc)


def _video_request(**fields):
    from k5.engine.pipelines.video import Request

    return Request(**fields)


def argparse_ns(**kw):
    import argparse

    return argparse.Namespace(**kw)


def serves_edits(gargs) -> bool:
    """Whether the checkpoint ``gargs`` names edits images (so its server takes POST /v1/images/edits)."""
    if gargs.model == "tiny-image":
        return (gargs.task or "i2i") == "i2i"  # one tiny checkpoint per task: the I2I one also runs t2i
    if gargs.task is not None:
        return gargs.task == "i2i"
    from k5.engine.checkpoints.files import is_image_checkpoint
    from k5.engine.pipelines.image_request import checkpoint_task
    from k5.launch import model as model_flags

    resolved = model_flags.resolve(gargs)
    return is_image_checkpoint(resolved.root) and checkpoint_task(resolved.config) == "i2i"
