//! Language runtimes: where the interpreter lives on the host and the
//! minimal set of read-only mounts it needs inside the sandbox.
//!
//! Every sandbox gets the interpreter binary (with its symlink chain), the
//! system library directories, `/usr/share/zoneinfo` and `/etc/ld.so.cache`; the shell additionally
//! gets `/usr/bin` so that coreutils exist. An interpreter outside `/usr`
//! (for example `/opt/python/bin/python3`) brings its prefix along. Nothing
//! else of the host's filesystem is visible.

use std::fs;
use std::path::{Path, PathBuf};

use airlock_policy::Language;

use crate::error::SandboxError;
use crate::proto::RoMount;

/// A resolved runtime for one language.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The language.
    pub language: Language,
    /// Interpreter path as the program sees it (argv[0]).
    pub interpreter: String,
    /// Read-only bind mounts.
    pub mounts: Vec<RoMount>,
    /// Symlinks to recreate: (path, target).
    pub symlinks: Vec<(String, String)>,
    /// Arguments between the interpreter and the script path.
    pub args: Vec<String>,
    /// Default script extension.
    pub extension: &'static str,
}

/// Default interpreter locations, tried in order.
pub fn default_candidates(lang: Language) -> &'static [&'static str] {
    match lang {
        Language::Python => &["/usr/bin/python3", "/usr/local/bin/python3"],
        Language::Javascript => &["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"],
        Language::Shell => &["/bin/sh", "/usr/bin/sh"],
    }
}

/// The host's library directories a runtime binds whole.
pub const SYSTEM_LIB_DIRS: [&str; 6] = [
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/lib",
    "/lib64",
    "/lib32",
];

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolves `lang`'s runtime, using `interpreter` when given or the default
/// candidates otherwise.
pub fn resolve(lang: Language, interpreter: Option<&Path>) -> Result<Runtime, SandboxError> {
    let missing = || SandboxError::RuntimeMissing(lang.as_str());
    let chosen: PathBuf = match interpreter {
        Some(p) if p.is_absolute() && is_executable_file(p) => p.to_path_buf(),
        Some(_) => return Err(missing()),
        None => default_candidates(lang)
            .iter()
            .map(PathBuf::from)
            .find(|p| is_executable_file(p))
            .ok_or_else(missing)?,
    };
    let interpreter = chosen.to_str().ok_or_else(missing)?.to_string();

    let mut mounts: Vec<RoMount> = Vec::new();
    let mut symlinks: Vec<(String, String)> = Vec::new();

    // Top-level symlinks first (merged /usr: /lib -> usr/lib, /bin -> usr/bin).
    for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32"] {
        if let Ok(target) = fs::read_link(top)
            && let Some(t) = target.to_str()
        {
            symlinks.push((top.to_string(), t.to_string()));
        }
    }
    for d in SYSTEM_LIB_DIRS {
        let p = Path::new(d);
        if fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            mounts.push(RoMount {
                host: d.into(),
                target: d.into(),
            });
        }
    }
    // Time zone data: harmless, and programs expect it (python's zoneinfo).
    if Path::new("/usr/share/zoneinfo").is_dir() {
        mounts.push(RoMount {
            host: "/usr/share/zoneinfo".into(),
            target: "/usr/share/zoneinfo".into(),
        });
    }
    if lang == Language::Shell {
        mounts.push(RoMount {
            host: "/usr/bin".into(),
            target: "/usr/bin".into(),
        });
    }

    // Walk the interpreter's symlink chain with canonical parents.
    let mut current = canonical_parent(&chosen).ok_or_else(missing)?;
    let mut chain = Vec::new();
    for _ in 0..16 {
        match fs::read_link(&current) {
            Ok(target) => {
                let next = if target.is_absolute() {
                    target.clone()
                } else {
                    current.parent().ok_or_else(missing)?.join(&target)
                };
                chain.push((
                    current.to_str().ok_or_else(missing)?.to_string(),
                    target.to_str().ok_or_else(missing)?.to_string(),
                ));
                current = canonical_parent(&next).ok_or_else(missing)?;
            }
            Err(_) => break,
        }
    }
    let real = current.to_str().ok_or_else(missing)?.to_string();
    if !is_executable_file(&current) {
        return Err(missing());
    }
    let covered = |p: &str, mounts: &[RoMount]| {
        mounts
            .iter()
            .any(|m| p == m.target || p.starts_with(&format!("{}/", m.target)))
    };
    // An interpreter outside /usr brings its installation prefix along.
    if let Some(prefix) = current.parent().and_then(Path::parent) {
        let prefix_s = prefix.to_str().unwrap_or("/");
        if prefix_s != "/usr" && prefix_s != "/" && !covered(prefix_s, &mounts) {
            mounts.push(RoMount {
                host: prefix_s.into(),
                target: prefix_s.into(),
            });
        }
    }
    if !covered(&real, &mounts) {
        mounts.push(RoMount {
            host: real.clone(),
            target: real.clone(),
        });
    }
    for (path, target) in chain {
        if !covered(&path, &mounts) && !symlinks.iter().any(|(p, _)| *p == path) {
            symlinks.push((path, target));
        }
    }
    // The path the program is started with must exist inside too: when
    // `chosen` itself runs through a top-level symlink (/bin/sh), the
    // recreated /bin link covers it.

    let (args, extension) = args_and_extension(lang);
    Ok(Runtime {
        language: lang,
        interpreter,
        mounts,
        symlinks,
        args,
        extension,
    })
}

/// The interpreter's arguments before the script, and the script's
/// extension.
fn args_and_extension(lang: Language) -> (Vec<String>, &'static str) {
    match lang {
        Language::Python => (vec!["-I".into(), "-B".into(), "-u".into()], "py"),
        Language::Javascript => (vec![], "js"),
        Language::Shell => (vec![], "sh"),
    }
}

/// `lang`'s runtime inside an image: its own interpreter, nothing of the
/// host bound.
pub fn in_image(lang: Language, image: &crate::hosted::ImageRoot) -> Result<Runtime, SandboxError> {
    let interpreter = image
        .interpreters
        .iter()
        .find(|(l, _)| *l == lang)
        .map(|(_, p)| p.clone())
        .ok_or(SandboxError::RuntimeMissing(lang.as_str()))?;
    let (args, extension) = args_and_extension(lang);
    Ok(Runtime {
        language: lang,
        interpreter,
        mounts: Vec::new(),
        symlinks: Vec::new(),
        args,
        extension,
    })
}

/// `p` with its parent directory canonicalised (the last component is kept
/// as is, so a final symlink is not followed).
fn canonical_parent(p: &Path) -> Option<PathBuf> {
    let parent = p.parent()?.canonicalize().ok()?;
    Some(parent.join(p.file_name()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_runtime_resolves_on_this_host() {
        let rt = resolve(Language::Shell, None).unwrap();
        assert!(rt.mounts.iter().any(|m| m.target == "/usr/bin"));
        assert!(
            rt.mounts
                .iter()
                .all(|m| !m.target.starts_with("/etc") && !m.target.starts_with("/home"))
        );
    }

    #[test]
    fn missing_interpreter_is_a_clear_error() {
        let err = resolve(Language::Python, Some(Path::new("/nonexistent/python3"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the python runtime is not installed on this host"
        );
        assert!(resolve(Language::Python, Some(Path::new("relative/python3"))).is_err());
    }
}
