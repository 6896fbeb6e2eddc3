//! The files under the log, behind two small traits so that tests can run the log on a simulated disk:
//! [`Disk`] (the directory: create, open, rename, remove, list, sync) and [`LogFile`] (one file: positioned
//! writes and reads, `fdatasync`, length). [`OsDisk`] is the real one (std's `FileExt`, no `unsafe`).
//! [`SimDisk`] keeps what a disk keeps across a power cut: only synced bytes and synced directory entries
//! are sure to survive; at a crash it applies some prefix of the unsynced writes, the last of them torn at
//! any byte, and some prefix of the unsynced renames; it can flip bits and fail an `fdatasync`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One file of the log.
pub trait LogFile: Send + 'static {
    /// Writes all of `buf` at `offset` (the file grows as needed).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`). After an error nothing is known about them.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// Sets the length (zeros when it grows); durable with the next `sync_data`.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` and makes it durable, as `write_at` then `sync_data` do (the real
    /// file does it in one `pwritev2(RWF_DSYNC)`).
    fn write_durable_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.sync_data()
    }
    /// Reserves `len` bytes from the start, as `how` says, and makes that durable.
    fn preallocate(&mut self, len: u64, how: Prealloc) -> io::Result<()> {
        match how {
            Prealloc::Grow => Ok(()),
            Prealloc::ZeroFill | Prealloc::Fallocate => {
                let have = self.size()?;
                if have < len {
                    self.set_len(len)?;
                }
                self.sync_data()
            }
        }
    }
}

/// How a new segment's space is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Not at all: every commit grows the file, so every `fdatasync` also commits the new size (on ext4, a
    /// journal commit).
    #[default]
    Grow,
    /// Zeros written and synced before use: a commit then syncs data only, at the price of writing every
    /// segment twice.
    ZeroFill,
    /// `fallocate`: the extents are reserved but unwritten, so the first write to each converts it (a
    /// journal commit again, in smaller steps).
    Fallocate,
}

/// How a commit makes its write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `pwrite`, then `fdatasync`: two syscalls.
    #[default]
    Fdatasync,
    /// One `pwritev2` with `RWF_DSYNC`.
    Dsync,
}

/// The directory the log lives in (clones are the same directory: the log prepares its next segment on a
/// thread of its own).
pub trait Disk: Clone + Send + Sync + 'static {
    /// Its files.
    type File: LogFile;
    /// Creates `path`, which must not exist, for reading and writing.
    fn create_new(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file, for writing too if `write`.
    fn open(&self, path: &Path, write: bool) -> io::Result<Self::File>;
    /// Renames atomically (durable once the directory is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (durable once the directory is synced).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable (`fsync` of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

/// A real file.
#[derive(Debug)]
pub struct OsFile(File);

impl LogFile for OsFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.0.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn write_durable_at(&mut self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        use rustix::io::{ReadWriteFlags, pwritev2};
        while !buf.is_empty() {
            match pwritev2(&self.0, &[io::IoSlice::new(buf)], offset, ReadWriteFlags::DSYNC) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    fn preallocate(&mut self, len: u64, how: Prealloc) -> io::Result<()> {
        match how {
            Prealloc::Grow => return Ok(()),
            Prealloc::Fallocate => {
                rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len)?;
            }
            Prealloc::ZeroFill => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = self.size()?;
                // A megabyte at a time, each synced: written all at once and then synced, 64 MiB of zeros
                // queue ahead of every commit's sync on the device while they drain.
                while at < len {
                    let n = (len - at).min(zeros.len() as u64) as usize;
                    self.0.write_all_at(&zeros[..n], at)?;
                    self.0.sync_data()?;
                    at += n as u64;
                }
            }
        }
        self.0.sync_data()
    }
}

impl Disk for OsDisk {
    type File = OsFile;
    fn create_new(&self, path: &Path) -> io::Result<OsFile> {
        OpenOptions::new().read(true).write(true).create_new(true).open(path).map(OsFile)
    }
    fn open(&self, path: &Path, write: bool) -> io::Result<OsFile> {
        OpenOptions::new().read(true).write(write).open(path).map(OsFile)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A simulated disk for crash tests (see the module's doc). Clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<Sim>>);

#[derive(Debug, Default)]
struct Sim {
    inodes: HashMap<u64, Inode>,
    /// Directory entries as the running system sees them, and as they are durable.
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// Entry changes not yet durable, per directory, in order: (name, inode or removed).
    dir_ops: BTreeMap<PathBuf, Vec<(PathBuf, Option<u64>)>>,
    dirs: Vec<PathBuf>,
    next_inode: u64,
    /// Bumped at every crash: handles opened before it fail.
    epoch: u64,
    /// The next `fdatasync`s to fail.
    fail_syncs: u32,
    syncs: u64,
    /// No space left: a write or length change that would grow a file fails (ENOSPC).
    full: bool,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes), or a length change (offset = new length, no
    /// bytes and `truncate`).
    pending: Vec<Pending>,
}

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(data: &mut Vec<u8>, op: &Pending, keep: Option<usize>) {
    match op {
        Pending::Write(at, bytes) => {
            let bytes = &bytes[..keep.unwrap_or(bytes.len()).min(bytes.len())];
            let at = *at as usize;
            if data.len() < at + bytes.len() {
                data.resize(at + bytes.len(), 0);
            }
            data[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Pending::SetLen(len) => data.resize(*len as usize, 0),
    }
}

/// A file on a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    inode: u64,
    epoch: u64,
    write: bool,
}

fn crashed() -> io::Error {
    io::Error::other("simulated disk: this handle was opened before a crash")
}

impl SimDisk {
    fn lock(&self) -> MutexGuard<'_, Sim> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `n` calls of `sync_data` fail (with EIO), and the writes they would have synced are
    /// lost at the next crash (the kernel dropped the pages it could not write).
    pub fn fail_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// While `full`, writes and length changes that would grow a file fail with `StorageFull` (space a
    /// file already has, preallocated, can still be written).
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// `fdatasync` calls so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// A power cut. For each file, `tear(pending writes)` chooses how many of its unsynced writes reached
    /// the disk and how many bytes of the next one did; `dirs(pending entry changes)` how many unsynced
    /// directory changes did. Then every handle opened before is dead.
    pub fn crash(&self, mut tear: impl FnMut(usize) -> (usize, usize), mut dirs: impl FnMut(usize) -> usize) {
        let mut s = self.lock();
        for inode in s.inodes.values_mut() {
            let mut data = std::mem::take(&mut inode.durable);
            let (whole, torn) = tear(inode.pending.len());
            let whole = whole.min(inode.pending.len());
            for op in &inode.pending[..whole] {
                apply(&mut data, op, None);
            }
            if let Some(op) = inode.pending.get(whole) {
                apply(&mut data, op, Some(torn));
            }
            inode.durable = data.clone();
            inode.current = data;
            inode.pending.clear();
        }
        let ops = std::mem::take(&mut s.dir_ops);
        let mut names = s.durable_names.clone();
        for (_, ops) in ops {
            let n = dirs(ops.len()).min(ops.len());
            for (name, inode) in &ops[..n] {
                match inode {
                    Some(i) => names.insert(name.clone(), *i),
                    None => names.remove(name),
                };
            }
        }
        s.durable_names = names.clone();
        s.names = names;
        s.epoch += 1;
    }

    /// A crash that keeps exactly what was synced.
    pub fn crash_clean(&self) {
        self.crash(|_| (0, 0), |_| 0);
    }

    /// Flips one bit of a file's durable (and current) bytes: media corruption.
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) {
        let mut s = self.lock();
        let Some(&i) = s.names.get(path) else { return };
        if let Some(inode) = s.inodes.get_mut(&i) {
            for data in [&mut inode.durable, &mut inode.current] {
                if let Some(b) = data.get_mut(byte) {
                    *b ^= 1 << (bit % 8);
                }
            }
        }
    }

    /// A file's current bytes (for tests).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        s.names.get(path).and_then(|i| s.inodes.get(i)).map(|i| i.current.clone())
    }

    fn entry(s: &mut Sim, path: &Path, inode: Option<u64>) {
        match inode {
            Some(i) => s.names.insert(path.to_owned(), i),
            None => s.names.remove(path),
        };
        let dir = path.parent().unwrap_or(Path::new("")).to_owned();
        s.dir_ops.entry(dir).or_default().push((path.to_owned(), inode));
    }

    fn with_inode<T>(&self, f: &SimFile, op: impl FnOnce(&mut Inode, &mut Sim) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.lock();
        if s.epoch != f.epoch {
            return Err(crashed());
        }
        let mut inode = s.inodes.remove(&f.inode).ok_or_else(crashed)?;
        let r = op(&mut inode, &mut s);
        s.inodes.insert(f.inode, inode);
        r
    }
}

impl LogFile for SimFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.write {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.disk.clone().with_inode(self, |i, s| {
            if s.full && offset + buf.len() as u64 > i.current.len() as u64 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let op = Pending::Write(offset, buf.to_vec());
            apply(&mut i.current, &op, None);
            i.pending.push(op);
            Ok(())
        })
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.disk.clone().with_inode(self, |i, s| {
            s.syncs += 1;
            if s.fail_syncs > 0 {
                s.fail_syncs -= 1;
                // The pages that failed are marked clean: they will never be written.
                i.pending.clear();
                return Err(io::Error::other("simulated disk: fdatasync failed (EIO)"));
            }
            i.durable = i.current.clone();
            i.pending.clear();
            Ok(())
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.disk.with_inode(self, |i, _| {
            let from = (offset as usize).min(i.current.len());
            let n = buf.len().min(i.current.len() - from);
            buf[..n].copy_from_slice(&i.current[from..from + n]);
            Ok(n)
        })
    }
    fn size(&self) -> io::Result<u64> {
        self.disk.with_inode(self, |i, _| Ok(i.current.len() as u64))
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.disk.clone().with_inode(self, |i, s| {
            if s.full && len > i.current.len() as u64 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let op = Pending::SetLen(len);
            apply(&mut i.current, &op, None);
            i.pending.push(op);
            Ok(())
        })
    }
}

impl Disk for SimDisk {
    type File = SimFile;
    fn create_new(&self, path: &Path) -> io::Result<SimFile> {
        let mut s = self.lock();
        if s.names.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if !path.parent().is_some_and(|d| s.dirs.iter().any(|x| x == d)) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        s.next_inode += 1;
        let inode = s.next_inode;
        s.inodes.insert(inode, Inode::default());
        Self::entry(&mut s, path, Some(inode));
        Ok(SimFile { disk: self.clone(), inode, epoch: s.epoch, write: true })
    }
    fn open(&self, path: &Path, write: bool) -> io::Result<SimFile> {
        let s = self.lock();
        let inode = *s.names.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(SimFile { disk: self.clone(), inode, epoch: s.epoch, write })
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let inode = *s.names.get(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Self::entry(&mut s, from, None);
        Self::entry(&mut s, to, Some(inode));
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.names.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Self::entry(&mut s, path, None);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        // Directories themselves are durable at once (the log's directory is made once, before any data).
        for d in dir.ancestors() {
            if !s.dirs.iter().any(|x| x == d) {
                s.dirs.push(d.to_owned());
            }
        }
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if let Some(ops) = s.dir_ops.remove(dir) {
            for (name, inode) in ops {
                match inode {
                    Some(i) => s.durable_names.insert(name, i),
                    None => s.durable_names.remove(&name),
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (SimDisk, PathBuf) {
        let disk = SimDisk::default();
        let dir = PathBuf::from("/spool/log");
        disk.create_dir_all(&dir).unwrap();
        (disk, dir)
    }

    #[test]
    fn only_synced_bytes_and_entries_survive_a_clean_crash() {
        let (disk, dir) = dir();
        let a = dir.join("a");
        let mut f = disk.create_new(&a).unwrap();
        f.write_at(b"hello", 0).unwrap();
        disk.crash_clean();
        assert!(disk.open(&a, false).is_err(), "the entry was never synced");
        assert!(f.write_at(b"x", 0).is_err(), "handles die with the crash");

        let mut f = disk.create_new(&a).unwrap();
        disk.sync_dir(&dir).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b" world", 5).unwrap();
        disk.crash_clean();
        let f = disk.open(&a, false).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
    }

    #[test]
    fn a_crash_tears_the_first_unsynced_write_it_does_not_keep() {
        let (disk, dir) = dir();
        let a = dir.join("a");
        let mut f = disk.create_new(&a).unwrap();
        disk.sync_dir(&dir).unwrap();
        f.write_at(b"aaaa", 0).unwrap();
        f.write_at(b"bbbb", 4).unwrap();
        f.write_at(b"cccc", 8).unwrap();
        disk.crash(|n| (n.min(1), 2), |_| 0);
        assert_eq!(disk.contents(&a).unwrap(), b"aaaabb");
    }

    #[test]
    fn a_failed_sync_loses_its_writes_at_the_crash_and_unsynced_renames_may_be_lost() {
        let (disk, dir) = dir();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut f = disk.create_new(&a).unwrap();
        disk.sync_dir(&dir).unwrap();
        f.write_at(b"data", 0).unwrap();
        disk.fail_syncs(1);
        assert!(f.sync_data().is_err());
        disk.rename(&a, &b).unwrap();
        assert_eq!(disk.list(&dir).unwrap(), ["b"]);
        disk.crash(|n| (n, 0), |_| 0);
        assert_eq!(disk.list(&dir).unwrap(), ["a"], "the rename was not synced");
        assert_eq!(disk.contents(&a).unwrap(), b"", "the failed sync's pages were dropped");
    }
}
