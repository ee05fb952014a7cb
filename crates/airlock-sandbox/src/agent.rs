//! The agent: airlock's init for an isolation someone else built.
//!
//! An OCI runtime (crun, runc) or gVisor's runsc has already made the
//! namespaces, the read-only root, the scratch mounts and the cgroup when it
//! starts `airlock __airlock-agent` as the container's first process, with
//! the control socket at descriptor 3 and the broker and egress channels at
//! 4 and 5. The agent applies the layers the runtime does not (its own
//! session, closed descriptors, non-dumpable, no core files, no
//! capabilities, no_new_privs, Landlock where the host kernel serves the
//! code, the same seccomp programs as the process sandbox), reports
//! `Ready`, and then runs exactly one job as init does: the same code path
//! ([`crate::init::run_job`]), so the program starts, is limited, reaped
//! and reported identically on every backend. The microVM guest will run
//! this agent too.
//!
//! Must never: run anything tenant-specific before every layer is applied;
//! keep a descriptor beyond the channels; trust the runtime's word for a
//! layer it can check itself (capabilities are verified empty).

use std::os::unix::net::UnixStream;

use crate::init::{JobChannels, Step, StepResult, at, lock_down, report, serve_job};
use crate::launch::{AGENT_BINARY_FD, BROKER_FD, CONTROL_FD, EGRESS_FD, Launch, MEMORY_EVENTS_FD};
use crate::proto::{self, AgentConfig, ToInit};
use crate::sys;

/// argv[1] that makes the airlock binary act as the agent.
pub const AGENT_ARG: &str = "__airlock-agent";

/// Entry point of the agent (`airlock __airlock-agent`). Never returns.
///
/// The agent leaves (and, as pid 1, ends every process of the sandbox) as
/// soon as its control channel hangs up, while it waits for its job and
/// while the program runs: its engine is gone.
pub fn main(args: &[String]) -> ! {
    if !args.is_empty() {
        sys::exit_now(2);
    }
    // Die with the runtime process that started us (crun, runsc): when it
    // is killed, so is everything here.
    if sys::set_parent_death_kill().is_err() {
        sys::exit_now(1);
    }
    // Nothing beyond the channels, but for a guest's memory events (kept
    // only when the configuration says so, below).
    if sys::close_from(MEMORY_EVENTS_FD as u32 + 1).is_err() {
        sys::exit_now(1);
    }
    sys::close_unowned(AGENT_BINARY_FD);
    if !sys::is_socket(CONTROL_FD) {
        sys::exit_now(1);
    }
    // SAFETY: the runtime passes the control socket as descriptor 3 and
    // nothing else in this freshly exec'd process owns it.
    let mut ctrl = UnixStream::from(unsafe { sys::owned(CONTROL_FD) });
    let cfg = match proto::read_msg::<_, ToInit>(&mut ctrl, proto::MAX_TO_INIT) {
        Ok(ToInit::AgentConfig(cfg)) => cfg,
        _ => {
            report(&mut ctrl, (Step::ReadConfig, libc::EINVAL));
            sys::exit_now(1)
        }
    };
    let (abi, full) = match prepare(&cfg) {
        Ok(v) => v,
        Err(e) => {
            report(&mut ctrl, e);
            sys::exit_now(1)
        }
    };
    serve_job(
        ctrl,
        (abi, full),
        JobChannels {
            broker: cfg.broker,
            egress: cfg.egress,
            relay: cfg.egress_relay,
            watch: true,
            memory_events: cfg.guest_memory_events.then_some(MEMORY_EVENTS_FD),
            code_dir: crate::launch::code_dir(cfg.session_workspace),
            in_session: cfg.session_workspace,
        },
        Launch::Exec,
    )
}

/// Checks the channels the configuration announces and applies the
/// agent's layers.
fn prepare(cfg: &AgentConfig) -> StepResult<(u32, bool)> {
    // Without a broker, descriptor 4 is whatever the runtime passed in
    // its place: close it. With one, it must be a socket.
    for (wanted, fd) in [(cfg.broker, BROKER_FD), (cfg.egress, EGRESS_FD)] {
        if !wanted {
            sys::close_unowned(fd);
        } else if !sys::is_socket(fd) {
            return Err((Step::CloseFds, libc::EBADF));
        }
    }
    // A guest's memory events: a file, never passed on (close-on-exec, and
    // the zygote's path closes everything above the channels).
    if !cfg.guest_memory_events {
        sys::close_unowned(MEMORY_EVENTS_FD);
    } else if sys::is_socket(MEMORY_EVENTS_FD) || sys::set_cloexec(MEMORY_EVENTS_FD).is_err() {
        return Err((Step::CloseFds, libc::EBADF));
    }
    if cfg.loopback {
        at(Step::Loopback, sys::loopback_up())?;
    }
    // Linux spares a namespace's init the signals it has no handler for;
    // gVisor does not: nothing the code routes here may end the agent.
    if cfg.protect_pid1 {
        sys::ignore_signals();
    }
    lock_down(cfg.landlock, &cfg.seccomp, cfg.guest_memory_events)
}
