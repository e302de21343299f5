"""Quartet's model-role services: the one server runtime (`services.common`), one folder per role,
and the launcher of the embedded stack.

gRPC's fork support re-arms its poller in every forked child. A child forked by `subprocess` with a
`preexec_fn` (the launcher's, for PR_SET_PDEATHSIG) then crashes now and then between fork and exec
(SIGABRT "epoll_wait error: Bad file descriptor", or SIGSEGV): 11 of 150 starts measured here with a
busy channel in the parent, 0 of 150 with fork support off. Quartet never uses gRPC in a forked
child that does not exec, so fork support is off unless the environment says otherwise. It is read
when grpc is first imported: every package of ours imports this one before grpc.
"""

import os as _os

_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
