"""The launcher of `make supernet`, `make search`, `make retrain` and `make fidelity`: torchrun
(``torch.distributed.run``, same arguments) whose exit status is the workers' own. A worker that stopped on a
user error has printed its one ``error:`` line and exited 2; plain torchrun would add its ChildFailedError report
and exit 1. Here the launcher prints nothing more and exits 2 (1 for a divergence, the largest worker status
otherwise). After Ctrl-C / SIGTERM, whose workers finish the step, checkpoint and exit 0, it exits 0; if a worker
did not (it died of the signal, or was still running when torchrun killed it 30 s later), it says which in one line
and exits 1.

    python -m supernet.engine.launch --standalone --nproc_per_node=2 -m supernet.train optim.epochs=1
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException, SubprocessContext
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

# The workers' exit statuses once torchrun has closed them after a signal (it sends the signal on, waits up to 30 s,
# then kills what is left): recorded so that the launcher exits 0 only when every worker stopped cleanly.
_stopped: list[int | None] = []
_torch_close = SubprocessContext._close


def _close_and_record(self: SubprocessContext, death_sig: signal.Signals, timeout: int = 30) -> None:
    _torch_close(self, death_sig, timeout)
    _stopped[:] = [h.proc.returncode for h in self.subprocess_handlers.values()]


SubprocessContext._close = _close_and_record


def main(argv: list[str] | None = None) -> int:
    # the agent logs each failed worker at ERROR level; the worker has already said why, in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(argv)
    nproc = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores (torchrun would set 1, with a banner)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(args)
    except ChildFailedError as e:  # ranks stopped by the launcher after the first failure show negative codes
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        return max(codes) if codes else 1
    except SignalException as e:  # the workers got the signal too: they finish the step, checkpoint and exit 0
        unclean = {rank: code for rank, code in enumerate(_stopped) if code != 0}
        if e.sigval in (signal.SIGINT, signal.SIGTERM) and not unclean:
            return 0
        name = signal.Signals(e.sigval).name
        if unclean:
            shown = ", ".join(f"rank {r}: " + ("did not exit" if code is None else f"exit {code}" if code > 0
                                                else signal.Signals(-code).name) for r, code in unclean.items())
            print(f"error: stopped by {name}, but not every worker finished its step and checkpoint ({shown}); "
                  "rerun the same command to resume from the last checkpoint on disk", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
