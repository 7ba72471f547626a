//! What a look at a file on disk sees, to tell that it changed: where its
//! path leads now and that file's identity, size and modification time.
//!
//! A look follows the path as it resolves at that moment, so every way a file
//! is replaced shows alike: an edit in place, a new file renamed over the
//! old, and the swap of the `..data` symlink with which Kubernetes updates a
//! ConfigMap or Secret volume (which changes no inode of the file itself).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One look at a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLook {
    target: Option<PathBuf>,
    device: u64,
    inode: u64,
    len: u64,
    modified_ns: i128,
    /// The inode's change time, mode and owner: `chmod` and `chown` change
    /// whether tether can read the file, and nothing else of the look.
    changed_ns: i128,
    mode: u32,
    owner: (u32, u32),
}

impl FileLook {
    /// Looks at `path`; `None` when nothing is there (or it cannot be read).
    pub fn at(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            target: std::fs::canonicalize(path).ok(),
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            changed_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            mode: meta.mode(),
            owner: (meta.uid(), meta.gid()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::FileLook;

    #[test]
    fn a_rename_over_the_file_is_a_change_and_rereading_is_not() {
        let dir = std::env::temp_dir().join(format!("tether-look-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cert.pem");
        std::fs::write(&path, "one").unwrap();
        let first = FileLook::at(&path);
        assert!(first.is_some());
        assert_eq!(first, FileLook::at(&path));
        let next = dir.join("cert.pem.new");
        std::fs::write(&next, "two").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let renamed = FileLook::at(&path);
        assert_ne!(first, renamed, "same size, new inode");
        let mut permissions = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
        std::fs::set_permissions(&path, permissions).unwrap();
        assert_ne!(
            renamed,
            FileLook::at(&path),
            "a chmod decides who can read it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(FileLook::at(&path), None);
    }
}
