//! seccomp: every denied syscall, ABI tricks, ioctl smuggling, socket families.

use super::*;

#[test]
fn every_denied_syscall_returns_eperm_inside_and_reaches_the_kernel_outside() {
    let out = outside("syscall_all");
    let inn = inside_ok("syscall_all");
    let map = inn.as_object().expect("map");
    assert!(map.len() >= 50, "{inn}");
    for (name, errno) in map {
        let want = if name == "clone3" {
            libc::ENOSYS as i64
        } else {
            EPERM
        };
        assert_eq!(errno.as_i64(), Some(want), "{name} inside: {inn}");
        // Outside, the same call is answered by the kernel itself (success
        // or an argument error), proving the EPERM inside comes from the filter.
        if is_root() {
            assert_ne!(
                out[name].as_i64(),
                Some(want),
                "{name} outside already gives {want}: {out}"
            );
        }
    }
}

#[test]
fn x32_abi_syscall_is_denied() {
    let out = outside("x32_getpid");
    let inn = inside_ok("x32_getpid");
    assert_eq!(inn["errno"], EPERM, "{inn}");
    assert_ne!(out["errno"], EPERM, "{out}");
}

#[test]
fn i386_int80_syscall_kills_the_process_with_sigsys() {
    let out = outside("int80");
    assert_eq!(out["survived"], true);
    let (r, _) = inside("int80", &[]);
    assert_eq!(r["signal"], libc::SIGSYS, "{r}");
    assert_eq!(r["reason"], "policy_violation", "{r}");
}

#[test]
fn clone_with_namespace_flags_is_denied() {
    let inn = inside_ok("clone_newuser");
    assert_eq!(inn["errno"], EPERM, "{inn}");
}

#[test]
fn tiocsti_injection_is_denied_even_with_high_bits_set() {
    for variant in ["plain", "high", "linux"] {
        let out = outside(&format!("tiocsti {variant}"));
        let inn = inside_ok(&format!("tiocsti {variant}"));
        assert_eq!(inn["errno"], EPERM, "{variant}: {inn}");
        // Outside the ioctl reaches the tty layer (stdin is a pipe: ENOTTY).
        assert_eq!(out["errno"], libc::ENOTTY, "{variant}: {out}");
    }
}

#[test]
fn vsock_packet_alg_raw_and_netlink_sockets_are_denied() {
    for fam in ["vsock", "packet", "alg", "raw", "netlink"] {
        let inn = inside_ok(&format!("socket {fam}"));
        assert_eq!(inn["errno"], EPERM, "{fam}: {inn}");
    }
    if is_root() {
        for fam in ["packet", "raw", "netlink"] {
            assert_eq!(
                outside(&format!("socket {fam}"))["errno"],
                0,
                "{fam} outside"
            );
        }
    }
    // Ordinary sockets still work inside.
    assert_eq!(inside_ok("socket inet")["errno"], 0);
    assert_eq!(inside_ok("socket unix")["errno"], 0);
}

#[test]
fn ptrace_and_process_vm_readv_on_a_child_are_denied() {
    let out = outside("ptrace_child");
    assert_eq!(out["ptrace_errno"], 0, "{out}");
    assert_eq!(out["vm_readv_errno"], 0, "{out}");
    let inn = inside_ok("ptrace_child");
    assert_eq!(inn["ptrace_errno"], EPERM, "{inn}");
    assert_eq!(inn["vm_readv_errno"], EPERM, "{inn}");
}

#[test]
fn raising_capabilities_is_denied() {
    let inn = inside_ok("caps_raise");
    assert_eq!(inn["capset_errno"], EPERM, "{inn}");
    assert_eq!(inn["ambient_errno"], EPERM, "{inn}");
}

#[test]
fn status_shows_no_capabilities_no_new_privs_and_seccomp_filter() {
    let out = outside("status");
    if is_root() {
        assert_ne!(out["CapEff"], "0000000000000000");
    }
    let inn = inside_ok("status");
    for k in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(inn[k], "0000000000000000", "{k}: {inn}");
    }
    assert_eq!(inn["NoNewPrivs"], "1");
    assert_eq!(inn["Seccomp"], "2");
    assert!(
        inn["Uid"].as_str().unwrap_or("").starts_with("1000"),
        "{inn}"
    );
}

#[test]
fn execve_after_start_is_denied_by_policy_switch() {
    let (_dir, policy) = policy_file("[syscalls]\ndeny_execve = true\n");
    // Without the switch, the child's execve works (exit 7).
    let (r, v) = inside("exec", &[]);
    assert_eq!(r["reason"], "exited");
    assert_eq!(v["status"], 7, "{v}");
    let (r, v) = inside("exec", &["--policy", &policy]);
    assert_eq!(r["reason"], "exited", "{r}");
    assert_eq!(r["enforced"]["seccomp"]["deny_execve"], true);
    assert_eq!(v["status"], 100 + libc::EPERM, "{v}");
}

#[test]
fn policy_extra_deny_adds_eperm() {
    let (_dir, policy) = policy_file("[syscalls]\ndeny = [\"uname\"]\n");
    let r = run_json(
        "python",
        "import os\ntry:\n    os.uname(); print('allowed')\nexcept OSError as e:\n    print(e.errno)\n",
        "",
        &["--policy", &policy],
    );
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        libc::EPERM.to_string(),
        "{r}"
    );
}
