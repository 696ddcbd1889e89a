//! `${CREDENTIALS_DIRECTORY}` in `*_file` paths, for secrets that systemd hands over with
//! `LoadCredential=` / `LoadCredentialEncrypted=` (systemd.exec(5), "Credentials"). Only that
//! one variable is expanded, and only from the environment systemd gives the service: a path
//! in the configuration never pulls in anything else from the environment.
//!
//! systemd copies each credential into a private directory (`/run/credentials/<unit>/`,
//! reachable by the service only) with mode 0400 when it can chown it to the service user,
//! or mode 0440 owned by root with an ACL granting the service user read (the group bits then
//! show the ACL mask). [`mode_allowed`] accepts that group read there, and only there.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The variable systemd sets when the unit has `LoadCredential=`.
pub const VAR: &str = "CREDENTIALS_DIRECTORY";
const REFERENCE: &str = "${CREDENTIALS_DIRECTORY}";

/// The credentials directory from a variable's value; empty counts as unset.
pub fn dir_from(value: Option<OsString>) -> Option<PathBuf> {
    value.filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The credentials directory of this process, if systemd set one.
pub fn dir_from_env() -> Option<PathBuf> {
    dir_from(std::env::var_os(VAR))
}

/// The path `value` names, with `${CREDENTIALS_DIRECTORY}` replaced by `dir`. `key` is the
/// configuration key, for the error when the variable is used but not set.
pub fn expand(key: &str, value: &str, dir: Option<&Path>) -> Result<PathBuf, String> {
    if !value.contains(REFERENCE) {
        return Ok(PathBuf::from(value));
    }
    match dir.and_then(Path::to_str) {
        Some(d) => Ok(PathBuf::from(value.replace(REFERENCE, d))),
        None if dir.is_some() => Err(format!(
            "{key}: {VAR} is not a UTF-8 path, so {value} cannot be expanded"
        )),
        None => Err(format!(
            "{key}: {value} uses {REFERENCE}, but {VAR} is not set: systemd sets it for the service when the unit has LoadCredential= (see docs/configuration.md, \"Secrets through systemd credentials\"); to run a command by hand, set it to the directory the credentials are loaded from, e.g. {VAR}=/etc/mailbridge/credentials mailbridge check-config"
        )),
    }
}

/// Whether `path` lies inside the credentials directory `dir` (after resolving symlinks and
/// `..`, so a path cannot borrow the exemption by naming the directory and leaving it).
pub fn within(path: &Path, dir: Option<&Path>) -> bool {
    let Some(dir) = dir else { return false };
    match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// Whether a secret file with permission bits `mode` may be used (behaviour.md C36): no
/// access for group or others (600, 400), except that inside the credentials directory group
/// read is allowed too (440, as systemd makes it). Others are never allowed, nor group write.
pub fn mode_allowed(path: &Path, mode: u32, dir: Option<&Path>) -> bool {
    mode & 0o077 == 0 || (mode & 0o037 == 0 && within(path, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_credentials_reference_is_expanded() {
        let d = Path::new("/run/credentials/mailbridge.service");
        assert_eq!(
            expand("k", "${CREDENTIALS_DIRECTORY}/entra.secret", Some(d)).unwrap(),
            d.join("entra.secret")
        );
        // Other variables and a bare $CREDENTIALS_DIRECTORY stay literal.
        for v in [
            "/etc/mailbridge/${HOME}/x",
            "$CREDENTIALS_DIRECTORY/x",
            "/a/b",
        ] {
            assert_eq!(expand("k", v, Some(d)).unwrap(), PathBuf::from(v));
            assert_eq!(expand("k", v, None).unwrap(), PathBuf::from(v));
        }
        let e = expand(
            "users[0].password_hash_file",
            "${CREDENTIALS_DIRECTORY}/h",
            None,
        )
        .unwrap_err();
        assert!(
            e.starts_with("users[0].password_hash_file: ${CREDENTIALS_DIRECTORY}/h uses")
                && e.contains("CREDENTIALS_DIRECTORY is not set")
                && e.contains("LoadCredential="),
            "{e}"
        );
        assert_eq!(dir_from(Some(OsString::new())), None);
    }

    #[test]
    fn group_read_is_allowed_inside_the_credentials_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        let inside = creds.join("secret");
        let outside = tmp.path().join("secret");
        std::fs::write(&inside, "x").unwrap();
        std::fs::write(&outside, "x").unwrap();
        let dir = Some(creds.as_path());
        for mode in [0o600, 0o400] {
            assert!(mode_allowed(&outside, mode, dir));
            assert!(mode_allowed(&inside, mode, dir));
        }
        assert!(mode_allowed(&inside, 0o440, dir));
        assert!(!mode_allowed(&inside, 0o440, None));
        assert!(!mode_allowed(&outside, 0o440, dir));
        // Escaping with `..` does not keep the exemption.
        let escaped = creds.join("..").join("secret");
        assert!(!mode_allowed(&escaped, 0o440, dir));
        assert!(mode_allowed(&inside, 0o640, dir));
        for mode in [0o444, 0o404, 0o460, 0o420] {
            assert!(!mode_allowed(&inside, mode, dir), "{mode:o}");
        }
    }
}
