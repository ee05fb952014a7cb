//! seccomp-BPF, compiled from data.
//!
//! The baseline policy is `seccomp/x86_64.json` (seccompiler's JSON format,
//! every rule with a `comment`), embedded at build time and compiled once per
//! engine. It holds three filters, installed in this order:
//!
//! 1. `allow`: an allowlist; anything not listed, including every x32-ABI
//!    syscall number and every syscall added to future kernels, gets EPERM.
//!    seccompiler prefixes the architecture check, so i386 (`int 0x80`) and
//!    any other ABI is killed with SIGSYS.
//! 2. `deny`: the explicit deny list (EPERM), kept as its own filter so that
//!    widening the allowlist by mistake cannot re-enable a dangerous call.
//! 3. `enosys`: clone3 gets ENOSYS so libc falls back to clone(2), whose
//!    flags the allowlist can inspect.
//!
//! The kernel evaluates every installed filter and keeps the most
//! restrictive action; between two errno actions the most recently installed
//! wins, which is why `enosys` is last.
//!
//! A policy can add names to deny (a fourth filter) and can deny execve after
//! start ([`install_deny_execve`]); it can never allow more.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::SandboxError;

/// The embedded baseline policy.
pub const BASELINE_JSON: &str = include_str!("../seccomp/x86_64.json");

/// Filters in installation order.
const ORDER: [&str; 3] = ["allow", "deny", "enosys"];

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// A compiled program as plain tuples, ready for the control channel.
pub type WireProgram = Vec<(u16, u8, u8, u32)>;

fn to_wire(p: &BpfProgram) -> WireProgram {
    p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
}

/// The baseline filters, compiled once.
pub fn baseline() -> Result<&'static [WireProgram], SandboxError> {
    static BASELINE: OnceLock<Result<Vec<WireProgram>, String>> = OnceLock::new();
    let compiled = BASELINE.get_or_init(|| {
        let mut map = seccompiler::compile_from_json(BASELINE_JSON.as_bytes(), ARCH)
            .map_err(|e| e.to_string())?;
        ORDER
            .iter()
            .map(|name| {
                map.remove(*name)
                    .map(|p| to_wire(&p))
                    .ok_or_else(|| format!("filter {name} missing"))
            })
            .collect()
    });
    compiled
        .as_deref()
        .map_err(|e| SandboxError::SeccompPolicy(e.clone()))
}

/// All programs for a policy: the baseline plus an optional filter denying
/// the policy's extra syscall names. Unknown names are an error.
pub fn programs_for(extra_deny: &[String]) -> Result<Vec<WireProgram>, SandboxError> {
    let mut progs = baseline()?.to_vec();
    if !extra_deny.is_empty() {
        let filter: Vec<serde_json::Value> = extra_deny
            .iter()
            .map(|n| serde_json::json!({ "syscall": n, "comment": "policy syscalls.deny" }))
            .collect();
        let doc = serde_json::json!({
            "extra": { "mismatch_action": "allow", "match_action": { "errno": libc::EPERM }, "filter": filter }
        });
        let text = doc.to_string();
        let mut map = seccompiler::compile_from_json(text.as_bytes(), ARCH).map_err(|e| {
            SandboxError::InvalidRequest(format!("syscalls.deny: {e}").chars().take(200).collect())
        })?;
        let p = map
            .remove("extra")
            .ok_or_else(|| SandboxError::SeccompPolicy("extra filter missing".into()))?;
        progs.insert(2, to_wire(&p));
    }
    Ok(progs)
}

/// fcntl's F_SETSIG (linux/fcntl.h; not exported by the libc crate).
const F_SETSIG: u64 = 10;

/// A filter that refuses (EPERM) every way of signalling pid 1 by its
/// number: kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, and
/// pidfd_open (whose descriptor could signal it); and fcntl(F_SETSIG),
/// which could make a descriptor owned by pid 1 send it any signal. The
/// host kernel ignores signals to a namespace's init it has no handler
/// for; gVisor's sentry delivers them, so under gVisor the code could kill
/// or stop the agent and have its own execution recorded as a platform
/// failure. kill(-1) already spares pid 1 everywhere.
pub fn protect_pid1() -> Result<WireProgram, SandboxError> {
    let build = || -> seccompiler::Result<BpfProgram> {
        let pid_is_1 = || -> seccompiler::Result<Vec<SeccompRule>> {
            Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                1,
            )?])?])
        };
        let mut rules = BTreeMap::new();
        for nr in [
            libc::SYS_kill,
            libc::SYS_tkill,
            libc::SYS_tgkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_rt_tgsigqueueinfo,
            libc::SYS_pidfd_open,
        ] {
            rules.insert(nr, pid_is_1()?);
        }
        // A descriptor's owner can be pid 1 (F_SETOWN, F_SETOWN_EX, the
        // FIOSETOWN/SIOCSPGRP ioctls, some behind a pointer): the signal
        // it sends is SIGIO or SIGURG, which the agent ignores, unless
        // F_SETSIG picks another. F_SETSIG is refused outright.
        rules.insert(
            libc::SYS_fcntl,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                F_SETSIG,
            )?])?],
        );
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            ARCH,
        )?;
        filter.try_into().map_err(seccompiler::Error::Backend)
    };
    build()
        .map(|p| to_wire(&p))
        .map_err(|e| SandboxError::SeccompPolicy(e.to_string()))
}

/// Installs, in the calling (single-threaded) process, a filter that lets
/// exactly one more `execve` through: the one whose path argument is the
/// pointer `path_ptr`. Every other execve and every execveat gets EPERM.
/// Without a pointer (a program that continues in an inherited
/// interpreter and never execs), every execve gets EPERM.
///
/// `path_ptr` lies in a page mapped at a random address by the caller; after
/// the exec that address space is gone, so the program would have to guess
/// a ~47-bit value to pass the check again.
pub fn install_deny_execve(path_ptr: Option<u64>) -> Result<(), i32> {
    let build = || -> seccompiler::Result<BpfProgram> {
        let mut rules = BTreeMap::new();
        let execve_rules = match path_ptr {
            Some(ptr) => vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::Ne,
                ptr,
            )?])?],
            None => vec![],
        };
        rules.insert(libc::SYS_execve, execve_rules);
        rules.insert(libc::SYS_execveat, vec![]);
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            ARCH,
        )?;
        filter.try_into().map_err(seccompiler::Error::Backend)
    };
    let prog = build().map_err(|_| libc::EINVAL)?;
    seccompiler::apply_filter(&prog).map_err(|e| match e {
        seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
            io.raw_os_error().unwrap_or(libc::EPERM)
        }
        _ => libc::EINVAL,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_compiles_with_three_filters() {
        let b = baseline().unwrap();
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    #[test]
    fn every_baseline_rule_has_a_comment() {
        let doc: serde_json::Value = serde_json::from_str(BASELINE_JSON).unwrap();
        for name in ORDER {
            for rule in doc[name]["filter"].as_array().unwrap() {
                assert!(
                    rule["comment"].as_str().is_some_and(|c| c.len() > 10),
                    "{rule}"
                );
            }
        }
    }

    #[test]
    fn required_denials_are_not_allowlisted() {
        let doc: serde_json::Value = serde_json::from_str(BASELINE_JSON).unwrap();
        let allowed: Vec<&str> = doc["allow"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .collect();
        let denied: Vec<&str> = doc["deny"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .collect();
        let required = "ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load init_module \
            finit_module delete_module mount umount2 pivot_root chroot fsopen fsconfig fsmount fspick open_tree \
            move_mount mount_setattr unshare setns setuid setgid setreuid setregid setresuid setresgid setfsuid \
            setfsgid setgroups capset bpf userfaultfd perf_event_open keyctl add_key request_key io_uring_setup \
            io_uring_enter io_uring_register name_to_handle_at open_by_handle_at reboot swapon swapoff acct syslog \
            settimeofday clock_settime clock_adjtime adjtimex quotactl";
        for name in required.split_whitespace() {
            assert!(!allowed.contains(&name), "{name} is allowlisted");
            assert!(denied.contains(&name), "{name} is not in the deny filter");
        }
        assert!(!allowed.contains(&"clone3"));
    }

    #[test]
    fn extra_deny_accepts_known_and_rejects_unknown_names() {
        assert_eq!(programs_for(&["getpid".into()]).unwrap().len(), 4);
        assert!(programs_for(&["no_such_syscall".into()]).is_err());
        assert_eq!(programs_for(&[]).unwrap().len(), 3);
    }
}
