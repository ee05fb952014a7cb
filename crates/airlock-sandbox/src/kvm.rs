//! A minimal KVM guest for `airlock doctor`: proves that /dev/kvm can
//! actually run guest code (some nested or paravirtual devices answer the
//! API version but cannot run a guest). The guest is 8 bytes of real-mode
//! code that writes 'A' to port 0x3f8 and halts.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// argv[1] that makes the airlock binary run the probe (in a child process
/// with a timeout, so a broken KVM cannot hang the caller).
pub const KVM_PROBE_ARG: &str = "__airlock-kvm-probe";

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
const KVM_GET_SREGS: libc::c_ulong = 0x8138_AE83;
const KVM_SET_SREGS: libc::c_ulong = 0x4138_AE84;
const KVM_SET_REGS: libc::c_ulong = 0x4090_AE82;
const KVM_RUN: libc::c_ulong = 0xAE80;

fn ioctl(fd: i32, req: libc::c_ulong, arg: usize) -> Result<i32, String> {
    // SAFETY: every request used here takes either an integer or a pointer
    // to a buffer of exactly the size encoded in the request number, which
    // the callers own for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(format!(
            "ioctl {req:#x}: {}",
            std::io::Error::last_os_error()
        ))
    } else {
        Ok(r)
    }
}

/// Runs the guest; returns a one-line description.
pub fn probe() -> Result<String, String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    let api = ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0)?;
    if api != 12 {
        return Err(format!("unexpected KVM API version {api}"));
    }
    let vm = ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0)?;
    // SAFETY: anonymous private mapping, no fixed address.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap guest memory failed".into());
    }
    let code: [u8; 8] = [0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4, 0xf4]; // mov dx,0x3f8; mov al,'A'; out dx,al; hlt
    // SAFETY: the mapping is 4096 writable bytes; 8 are written.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem as *mut u8, code.len()) };
    // struct kvm_userspace_memory_region { u32 slot, u32 flags, u64 gpa, u64 size, u64 uaddr }
    let region: [u64; 4] = [0, 0x1000, 0x1000, mem as u64];
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, region.as_ptr() as usize)?;
    let vcpu = ioctl(vm, KVM_CREATE_VCPU, 0)?;
    let run_size = ioctl(kvm.as_raw_fd(), KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
    // SAFETY: mapping the vcpu's kvm_run area as the KVM API documents.
    let run = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        )
    };
    if run == libc::MAP_FAILED {
        return Err("mmap kvm_run failed".into());
    }
    let mut sregs = [0u8; 312];
    ioctl(vcpu, KVM_GET_SREGS, sregs.as_mut_ptr() as usize)?;
    sregs[0..8].copy_from_slice(&0u64.to_ne_bytes()); // cs.base
    sregs[12..14].copy_from_slice(&0u16.to_ne_bytes()); // cs.selector
    ioctl(vcpu, KVM_SET_SREGS, sregs.as_ptr() as usize)?;
    let mut regs = [0u64; 18];
    regs[16] = 0x1000; // rip
    regs[17] = 0x2; // rflags
    ioctl(vcpu, KVM_SET_REGS, regs.as_ptr() as usize)?;
    let mut out = Vec::new();
    for _ in 0..16 {
        ioctl(vcpu, KVM_RUN, 0)?;
        // SAFETY: kvm_run is at least 48 bytes; exit_reason is the u32 at
        // offset 8 and the io exit record starts at offset 32.
        let (reason, port, data_off) = unsafe {
            let base = run as *const u8;
            let reason = *(base.add(8) as *const u32);
            let port = *(base.add(34) as *const u16);
            let off = *(base.add(40) as *const u64);
            (reason, port, off)
        };
        match reason {
            2 if port == 0x3f8 && (data_off as usize) < run_size => {
                // SAFETY: data_offset was checked to lie inside the mapping.
                out.push(unsafe { *(run as *const u8).add(data_off as usize) });
            }
            5 => {
                return if out == b"A" {
                    Ok("a real-mode guest ran (port I/O and HLT exits observed)".into())
                } else {
                    Err("guest halted without its output".into())
                };
            }
            other => return Err(format!("guest stopped with KVM exit reason {other}")),
        }
    }
    Err("guest did not halt".into())
}
