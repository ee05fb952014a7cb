//! The process backend: the code runs behind namespaces, a pivot_root'ed
//! read-only root, Landlock, seccomp, cgroups and rlimits applied by
//! airlock's own init ([`airlock_sandbox`]), on the host kernel.
//!
//! Enforces every layer of the policy. Its pools fork python sandboxes from
//! a zygote (interpreter and guest SDK loaded once), retired after
//! [`ZYGOTE_FORKS`] forks; other languages prepare each sandbox cold.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use airlock_sandbox::cgroup::{self, CgroupVersion, Layout};
use airlock_sandbox::{Engine, Sandbox, Zygote};

use crate::{
    Backend, BackendError, Enforced, Hooks, IsolationLevel, Job, Language, Prepared, Probe,
    Request, RunResult, Spec, Teardown, Template,
};

/// Sandboxes one python zygote forks before it is replaced (bounds how many
/// share its address-space layout and hash seed).
pub const ZYGOTE_FORKS: u64 = 1000;

/// The process sandbox as a [`Backend`].
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    engine: Arc<Engine>,
}

impl ProcessBackend {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        ProcessBackend { engine }
    }
}

/// Refuses a policy whose minimum level is above `level` (a backend never
/// runs code behind a weaker boundary than its policy asks, whoever chose
/// it).
pub(crate) fn check_level(
    name: &'static str,
    level: IsolationLevel,
    policy: &airlock_policy::Policy,
) -> Result<(), BackendError> {
    match policy.isolation.minimum {
        Some(m) if m > level => Err(BackendError::Unavailable {
            wanted: format!("isolation {m}"),
            offered: vec![format!("{name} ({level})")],
        }),
        _ => Ok(()),
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn level(&self) -> IsolationLevel {
        IsolationLevel::Container
    }

    fn validate(&self, req: &Request<'_>) -> Result<(), BackendError> {
        check_level(self.name(), self.level(), req.policy)?;
        Ok(self.engine.validate(req)?)
    }

    fn prepare(&self, spec: &Spec<'_>) -> Result<Box<dyn Prepared>, BackendError> {
        check_level(self.name(), self.level(), spec.policy)?;
        let sb = self
            .engine
            .prepare_with(spec.policy, spec.language, spec.extras)?;
        Ok(Box::new(ProcessSandbox(sb)))
    }

    fn sessions(&self) -> bool {
        true
    }

    fn template(&self, spec: &Spec<'_>) -> Result<Option<Arc<dyn Template>>, BackendError> {
        if spec.language != Language::Python
            || spec.extras.entry.is_none()
            || spec.extras.workspace.is_some()
        {
            return Ok(None);
        }
        // Python sandboxes are forked by a zygote (interpreter and guest
        // SDK loaded once) when the host has a shared libpython.
        let zygote = self.engine.start_zygote(spec.policy, spec.extras)?;
        Ok(Some(Arc::new(ZygoteTemplate {
            engine: self.engine.clone(),
            zygote,
        })))
    }

    fn reap(&self, host_state: &serde_json::Value) -> usize {
        reap_cgroups(&self.engine, host_state)
    }

    fn reap_stale(&self, previous_pid: Option<u32>) -> usize {
        self.engine
            .cgroup_layout()
            .map_or(0, |l| cgroup::reap_stale(l, previous_pid).len())
    }

    fn probe(&self) -> Probe {
        let policy = airlock_policy::Policy::default();
        let req = Request {
            language: Language::Shell,
            code: b"exit 0",
            file_name: None,
            stdin: b"",
            policy: &policy,
        };
        let (works, fix) = crate::verdict(
            self.engine
                .run(&req, &mut |_, _| {})
                .map_err(|e| e.to_string()),
        );
        Probe {
            backend: self.name(),
            isolation: self.level(),
            version: Some(format!("airlock {}", env!("CARGO_PKG_VERSION"))),
            works,
            fix,
        }
    }
}

/// Removes the cgroups a stored host state names, when they are sandbox
/// cgroups of this host's layout; returns how many.
pub(crate) fn reap_cgroups(engine: &Engine, host_state: &serde_json::Value) -> usize {
    let Some(layout) = engine.cgroup_layout() else {
        return 0;
    };
    let version = match layout {
        Layout::V2 { .. } => CgroupVersion::V2,
        _ => CgroupVersion::V1,
    };
    let dirs = host_state
        .get("cgroups")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut reaped = 0;
    for dir in dirs.iter().filter_map(serde_json::Value::as_str) {
        let dir = PathBuf::from(dir);
        if is_sandbox_cgroup(layout, &dir) && dir.exists() && cgroup::reap_dir(version, &dir) {
            reaped += 1;
        }
    }
    reaped
}

/// Only ever `<sandbox parent>/<pid>-<n>`: a stored row is data, and data
/// can be tampered with.
fn is_sandbox_cgroup(layout: &Layout, dir: &std::path::Path) -> bool {
    let plain = dir.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    let name_ok = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split_once('-'))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
    plain
        && name_ok
        && cgroup::sandbox_parents(layout)
            .iter()
            .any(|(_, p)| dir.parent() == Some(p.as_path()))
}

/// A prepared process sandbox.
#[derive(Debug)]
pub struct ProcessSandbox(Sandbox);

impl From<Sandbox> for ProcessSandbox {
    fn from(sb: Sandbox) -> Self {
        ProcessSandbox(sb)
    }
}

impl ProcessSandbox {
    /// The sandbox's name on this host (`<pid>-<n>`).
    pub fn name(&self) -> &str {
        self.0.name()
    }
}

impl Prepared for ProcessSandbox {
    fn enforced(&self) -> &Enforced {
        self.0.enforced()
    }

    fn prestart(&mut self) -> Result<(), BackendError> {
        Ok(self.0.prestart()?)
    }

    fn tighten(&mut self, limits: &airlock_policy::Limits) -> Result<(), BackendError> {
        Ok(self.0.tighten(limits)?)
    }

    fn is_alive(&self) -> bool {
        self.0.is_alive()
    }

    fn take_broker(&mut self) -> Option<UnixStream> {
        self.0.take_broker()
    }

    fn take_egress(&mut self) -> Option<OwnedFd> {
        self.0.take_egress()
    }

    fn host_state(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": "process",
            "isolation": self.0.enforced().isolation,
            "cgroups": self
                .0
                .cgroup_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>(),
        })
    }

    fn execute(self: Box<Self>, job: Job<'_>, hooks: Hooks<'_>) -> (RunResult, Teardown) {
        let (result, teardown) = self.0.execute_deferred(
            job.code,
            job.file_name,
            job.stdin,
            hooks.on_output,
            hooks.cancel,
            hooks.on_start,
        );
        (result, Teardown::new(teardown))
    }
}

/// Python sandboxes forked from a zygote.
#[derive(Debug)]
struct ZygoteTemplate {
    engine: Arc<Engine>,
    zygote: Zygote,
}

impl Template for ZygoteTemplate {
    fn spawn(&self) -> Result<Box<dyn Prepared>, BackendError> {
        Ok(Box::new(ProcessSandbox(
            self.engine.prepare_from(&self.zygote)?,
        )))
    }

    fn healthy(&self) -> bool {
        self.zygote.is_alive() && self.zygote.forks() < ZYGOTE_FORKS
    }

    fn is_fast(&self) -> bool {
        true
    }

    fn spawned(&self) -> u64 {
        self.zygote.forks()
    }
}
