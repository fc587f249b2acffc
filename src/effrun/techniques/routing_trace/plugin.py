from pathlib import Path

from effrun.technique import Technique


class RoutingTraceTechnique(Technique):
    def on_infer_start(self, model, session) -> None:
        from effrun.techniques._moe.trace import TraceRecorder

        meta = {"model": self.ctx.cfg.model.name, "prompt": self.ctx.cfg.run.prompt}
        self.rec = TraceRecorder(model, meta=meta).__enter__()  # outputs are unchanged

    def on_infer_end(self) -> None:
        self.rec.__exit__(None, None, None)
        ctx = self.ctx
        path = Path(self.cfg.path or ctx.run_dir / "routing_trace.npz").expanduser()
        trace = self.rec.trace()
        if ctx.is_main:
            trace.save(path)
        ctx.recorder.set("info/trace_path", str(path))
        ctx.recorder.set("measured/trace_tokens", trace.num_tokens)
        ctx.recorder.set("measured/trace_moe_layers", trace.num_layers)
