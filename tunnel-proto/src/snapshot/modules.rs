//! The Node-RED modules a snapshot pins: `modules.json`, an object of npm
//! package names to exact versions, and, for a device with no route to a
//! registry, the packages themselves as npm tarballs under `modules/`
//! (`modules/NAME.tgz`, the modules and every package they depend on).
//!
//! Pure checks, shared by the platform (which refuses a bad list before it
//! signs) and the device (which checks again before it runs npm): names
//! follow npm's rules, versions are exact (`1.2.3`, `1.2.3-rc.1`), never
//! ranges, tags or URLs, so what a device installs is what was signed.

use std::collections::BTreeMap;

/// The module list component.
pub const MODULES: &str = "modules.json";
/// The folder of tarballs in a snapshot.
pub const TARBALLS: &str = "modules";
/// Most modules a snapshot may pin.
pub const MAX_MODULES: usize = 256;
/// Largest `modules.json`, bytes.
pub const MAX_MODULES_FILE: usize = 64 * 1024;
/// Longest npm package name, with its scope.
const MAX_NAME: usize = 214;
/// Longest version string.
const MAX_VERSION: usize = 64;

/// One pinned module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub version: String,
}

impl Module {
    /// The npm spec that installs exactly this module: `name@version`.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Parses and checks `modules.json`; the modules sorted by name.
pub fn parse(bytes: &[u8]) -> Result<Vec<Module>, String> {
    if bytes.len() > MAX_MODULES_FILE {
        return Err(format!(
            "modules.json is {} bytes, more than {MAX_MODULES_FILE}",
            bytes.len()
        ));
    }
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| {
        format!("modules.json is not an object of npm package names to exact versions: {e}")
    })?;
    if map.len() > MAX_MODULES {
        return Err(format!(
            "modules.json pins {} modules, more than {MAX_MODULES}",
            map.len()
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, version) in map {
        if !is_package_name(&name) {
            return Err(format!(
                "modules.json: {name:?} is not an npm package name (lower case, [a-z0-9._~-], an optional @scope/, at most {MAX_NAME} bytes)"
            ));
        }
        if name == "node-red" || name.starts_with("@node-red/") {
            return Err(format!(
                "modules.json: {name:?} is Node-RED itself; a snapshot adds modules to the installed Node-RED, it does not replace it"
            ));
        }
        let Some(version) = version.as_str().filter(|v| is_exact_version(v)) else {
            return Err(format!(
                "modules.json: {name} has {version}, not an exact version such as \"1.4.2\" (no ranges, tags or URLs)"
            ));
        };
        out.push(Module {
            name,
            version: version.to_owned(),
        });
    }
    Ok(out)
}

/// npm's rules for a package name: lower case `[a-z0-9._~-]`, not starting
/// with `.` or `_`, optionally `@scope/name` with the same rules for the
/// scope, at most 214 bytes.
pub fn is_package_name(name: &str) -> bool {
    fn part(s: &str) -> bool {
        !s.is_empty()
            && !s.starts_with(['.', '_'])
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'~' | b'-')
            })
    }
    if name.is_empty() || name.len() > MAX_NAME {
        return false;
    }
    match name.strip_prefix('@') {
        Some(scoped) => {
            matches!(scoped.split_once('/'), Some((scope, rest)) if part(scope) && part(rest))
        }
        None => part(name),
    }
}

/// An exact semantic version: `MAJOR.MINOR.PATCH` without leading zeros,
/// optionally `-prerelease` and `+build` of `[0-9A-Za-z.-]`.
pub fn is_exact_version(version: &str) -> bool {
    if version.is_empty() || version.len() > MAX_VERSION {
        return false;
    }
    let (rest, build) = match version.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (version, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    let number = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    let ident = |s: &str| {
        s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| number(p))
        && pre.is_none_or(ident)
        && build.is_none_or(ident)
}

/// True if `path` is a tarball the snapshot carries: `modules/NAME.tgz`,
/// directly in the folder.
pub fn is_tarball(path: &str) -> bool {
    path.strip_prefix(TARBALLS)
        .and_then(|p| p.strip_prefix('/'))
        .is_some_and(|file| !file.contains('/') && file.len() > 4 && file.ends_with(".tgz"))
}

/// Checks how a snapshot's paths use the module names: anything under
/// `modules/` is a tarball, and tarballs come with a `modules.json` that
/// says which modules they install.
pub fn check_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut tarballs = 0;
    let mut list = false;
    for path in paths {
        if path == MODULES {
            list = true;
        } else if path.starts_with("modules/") {
            if !is_tarball(path) {
                return Err(format!(
                    "{path:?}: only npm tarballs (modules/NAME.tgz) may be under modules/"
                ));
            }
            tarballs += 1;
        }
    }
    if tarballs > 0 && !list {
        return Err(format!(
            "the snapshot carries {tarballs} module tarballs but no modules.json to say which modules they install"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_exact_versions_parses_sorted() {
        let modules =
            parse(br#"{"node-red-contrib-modbus": "5.43.0", "@flowfuse/nr-tools": "1.0.0-rc.2"}"#)
                .unwrap();
        assert_eq!(modules.len(), 2);
        assert_eq!(modules[0].spec(), "@flowfuse/nr-tools@1.0.0-rc.2");
        assert_eq!(modules[1].spec(), "node-red-contrib-modbus@5.43.0");
        assert_eq!(parse(b"{}").unwrap(), vec![]);
    }

    #[test]
    fn ranges_tags_urls_and_bad_names_are_refused_with_the_name() {
        for (bad, says) in [
            (r#"{"a": "^1.2.3"}"#, "a has \"^1.2.3\""),
            (r#"{"a": "latest"}"#, "not an exact version"),
            (r#"{"a": "1.2"}"#, "not an exact version"),
            (r#"{"a": "01.2.3"}"#, "not an exact version"),
            (r#"{"a": "git+https://x/y.git"}"#, "not an exact version"),
            (r#"{"a": "file:../x.tgz"}"#, "not an exact version"),
            (r#"{"a": 1}"#, "not an exact version"),
            (r#"{"Big": "1.0.0"}"#, "not an npm package name"),
            (r#"{"../x": "1.0.0"}"#, "not an npm package name"),
            (r#"{"@s": "1.0.0"}"#, "not an npm package name"),
            (r#"{"@s/a/b": "1.0.0"}"#, "not an npm package name"),
            (r#"{"node-red": "4.1.0"}"#, "Node-RED itself"),
            (r#"["a"]"#, "not an object"),
        ] {
            let err = parse(bad.as_bytes()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_MODULES)
            .map(|i| (format!("m{i}"), "1.0.0".to_owned()))
            .collect();
        let err = parse(&serde_json::to_vec(&many).unwrap()).unwrap_err();
        assert!(err.contains("more than 256"), "{err}");
        let err = parse(&vec![b' '; MAX_MODULES_FILE + 1]).unwrap_err();
        assert!(err.contains("bytes, more than"), "{err}");
    }

    #[test]
    fn versions_are_exact_semver() {
        for good in [
            "0.0.1",
            "1.2.3",
            "10.20.30",
            "1.0.0-alpha.1",
            "1.0.0+b.7",
            "1.0.0-x-y+z",
        ] {
            assert!(is_exact_version(good), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "v1.2.3",
            "1.2.x",
            "~1.2.3",
            "1.2.3-",
            "1.2.3-a..b",
            ">=1.0.0",
            "1.02.3",
        ] {
            assert!(!is_exact_version(bad), "{bad}");
        }
    }

    #[test]
    fn tarballs_live_in_modules_and_need_a_list() {
        assert!(is_tarball("modules/node-red-contrib-x-1.0.0.tgz"));
        assert!(!is_tarball("modules/.tgz"));
        assert!(!is_tarball("modules/a/b.tgz"));
        assert!(!is_tarball("modules/a.tar"));
        assert!(!is_tarball("modulesx/a.tgz"));
        assert!(check_paths(["flows.json", "modules.json", "modules/a-1.0.0.tgz"]).is_ok());
        assert!(check_paths(["flows.json", "modules.json"]).is_ok());
        let err = check_paths(["flows.json", "modules/a-1.0.0.tgz"]).unwrap_err();
        assert!(err.contains("no modules.json"), "{err}");
        let err = check_paths(["flows.json", "modules.json", "modules/run.sh"]).unwrap_err();
        assert!(err.contains("only npm tarballs"), "{err}");
    }
}
