from effrun.technique import Technique


class Intar(Technique):
    """Plan mode only: schedule search, cycle/resource model, instruction list, HLS C simulation."""

    def plan(self) -> None:
        from effrun.techniques.intar.plan import graphs_for, run_plan

        ctx = self.ctx
        n = len(graphs_for(self.cfg))
        rec = ctx.start_recorder(n, f"plan intar {self.cfg.graph or self.cfg.kernel} on {ctx.cfg.hardware.name}")
        run_plan(self.cfg, ctx.cfg.hardware, ctx.run_dir, rec, log=lambda m: print(m, flush=True))
