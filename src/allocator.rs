//! The C heap's settings for training. libtorch allocates CPU tensors with
//! malloc. glibc's malloc gives a freed allocation above its mmap threshold
//! back to the kernel, and trims the top of its heap once enough there is
//! free; its thresholds move with what the program frees, and a training
//! step frees and allocates the same activation and gradient buffers every
//! step, so a step keeps faulting their pages in afresh, each zeroed by the
//! kernel: from 4% to a third of the benchmark's CPU step on a 2-core VM,
//! and much of its step-to-step spread (docs/PERFORMANCE.md, "The C heap").
//!
//! samtrain sets fixed thresholds instead, once, before its threads start:
//! allocations up to 32 MiB come from the heap (glibc's largest allowed
//! threshold), and up to 1 GiB of free memory stays at its top. Freed
//! buffers are then reused by the next step. The cost is a process that
//! keeps the heap its largest step needed, which a training process needs
//! again at every step anyway. (PyTorch's CPU tuning guide suggests
//! jemalloc or tcmalloc for the same reason; samtrain needs neither.)
//!
//! `SAMTRAIN_MALLOC=glibc` keeps glibc's defaults, and a process given
//! its own malloc settings (`MALLOC_*_` or `GLIBC_TUNABLES` variables)
//! keeps them.

/// Allocations up to this size come from the heap, not their own mapping.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the heap's top kept rather than returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// The variable that turns the tuning off (`glibc`).
const OPT_OUT: &str = "SAMTRAIN_MALLOC";
/// Variables through which a user sets glibc's malloc themselves.
const USER_SETTINGS: [&str; 4] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
];

/// What [`tune`] did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuning {
    /// The thresholds were set.
    Applied,
    /// Left alone, and why.
    Skipped(String),
}

/// Whether to tune, given the environment's variable lookup.
fn decide(var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    match var(OPT_OUT).as_deref() {
        None | Some("") | Some("samtrain") => {}
        Some("glibc") => return Err(format!("{OPT_OUT}=glibc")),
        Some(other) => {
            return Err(format!(
                "{OPT_OUT}={other:?} is neither `samtrain` nor `glibc`; glibc's defaults kept"
            ))
        }
    }
    match USER_SETTINGS.iter().find(|name| var(name).is_some()) {
        Some(name) => Err(format!("{name} is set")),
        None => Ok(()),
    }
}

/// Sets the heap's thresholds unless the environment says otherwise. Call
/// it first thing in `main`, before any thread allocates.
pub fn tune() -> Tuning {
    if let Err(why) = decide(|name| std::env::var(name).ok()) {
        return Tuning::Skipped(why);
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Tuning {
    // SAFETY: mallopt only changes the allocator's parameters; no thread
    // of this process is allocating yet.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if ok {
        Tuning::Applied
    } else {
        Tuning::Skipped("mallopt refused the thresholds".into())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Skipped("not glibc's malloc".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn tunes_unless_told_not_to_or_given_settings() {
        assert_eq!(decide(env(&[])), Ok(()));
        assert_eq!(decide(env(&[("SAMTRAIN_MALLOC", "samtrain")])), Ok(()));
        assert_eq!(
            decide(env(&[("SAMTRAIN_MALLOC", "glibc")])),
            Err("SAMTRAIN_MALLOC=glibc".into())
        );
        assert!(decide(env(&[("SAMTRAIN_MALLOC", "jemalloc")]))
            .unwrap_err()
            .contains("neither `samtrain` nor `glibc`"));
        assert_eq!(
            decide(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])),
            Err("MALLOC_TRIM_THRESHOLD_ is set".into())
        );
        assert_eq!(
            decide(env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])),
            Err("GLIBC_TUNABLES is set".into())
        );
    }

    /// glibc accepts both values (mallopt answers 1): 32 MiB is its
    /// largest mmap threshold on 64-bit systems.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_thresholds() {
        assert_eq!(set_thresholds(), Tuning::Applied);
    }
}
