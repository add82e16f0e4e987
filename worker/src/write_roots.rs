//! Where a worker may write. A job spec names the places its workers write
//! to (`checkpoint.url`, `evaluation.output`, `data.cache_dir`,
//! `logging.tensorboard`); whoever
//! runs a worker can confine them with `--allow-write`, so that a spec
//! submitted to a shared cluster cannot overwrite the worker's own files or
//! write into another team's bucket. An assignment that names a place
//! outside every root is refused before anything is written.

use std::path::{Component, Path, PathBuf};

use samtrain_proto::spec::JobSpec;

/// The roots a worker may write under; none means anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteRoots(Vec<String>);

/// A location in one comparable form: object-store URLs as given, local
/// paths (plain or `file://`) absolute with `.` and `..` resolved.
fn normalised(location: &str) -> String {
    if let Some(path) = location.strip_prefix("file://") {
        return lexical(Path::new(path));
    }
    if location.contains("://") {
        return location.trim_end_matches('/').to_owned();
    }
    lexical(Path::new(location))
}

/// `path` made absolute (from the working directory) and its `.` and `..`
/// resolved without touching the file system (it may not exist yet).
fn lexical(path: &Path) -> String {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out.display().to_string()
}

impl WriteRoots {
    /// `roots` as local paths or object-store URL prefixes.
    pub fn new(roots: &[String]) -> WriteRoots {
        WriteRoots(roots.iter().map(|r| normalised(r)).collect())
    }

    /// Whether `location` is one of the roots or under one.
    fn allows(&self, location: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let place = normalised(location);
        self.0.iter().any(|root| {
            place == *root
                || place
                    .strip_prefix(root.as_str())
                    .is_some_and(|rest| rest.starts_with('/') || root.ends_with('/'))
        })
    }

    /// Every place `spec` makes a worker write to is under a root; else the
    /// first that is not, named with its field.
    pub fn check(&self, spec: &JobSpec) -> Result<(), String> {
        let places = [
            ("checkpoint.url", Some(spec.checkpoint.url.as_str())),
            ("evaluation.output", spec.evaluation.output.as_deref()),
            ("data.cache_dir", spec.data.cache_dir.as_deref()),
            ("logging.tensorboard", spec.logging.tensorboard.as_deref()),
        ];
        for (field, place) in places {
            if let Some(place) = place {
                if !self.allows(place) {
                    return Err(format!(
                        "{field} = `{place}` is outside the places this worker may write to ({}; --allow-write)",
                        self.0.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_places_under_a_root_are_allowed() {
        let roots = WriteRoots::new(&["/var/lib/samtrain".into(), "s3://team-a/ckpt".into()]);
        for ok in [
            "/var/lib/samtrain",
            "/var/lib/samtrain/out/eval",
            "file:///var/lib/samtrain/ckpt",
            "s3://team-a/ckpt/job-1",
        ] {
            assert!(roots.allows(ok), "{ok}");
        }
        for refused in [
            "/var/lib/samtrain-other",
            "/var/lib/samtrain/../../etc",
            "file:///etc/cron.d",
            "s3://team-a/ckpt-other",
            "s3://attacker-bucket/evil",
            "relative/path",
        ] {
            assert!(!roots.allows(refused), "{refused}");
        }
        assert!(WriteRoots::default().allows("/anywhere"));
    }
}
