//! Checkpoints on local disk: bit-exact round trips, the manifest as the
//! commit point, checksums, retention, resharding between tensor-parallel
//! sizes, and saves that return before their upload.

mod common;

use std::time::Duration;

use common::{assert_same, copy, model_state, shard, values};
use samtrain_checkpoint::{
    CheckpointError, CheckpointOptions, CheckpointTuning, Checkpointer, SaveStatus, ShardState,
};
use serde_json::json;
use tch::Tensor;

fn state(step: u64, tp_rank: u32, tp_size: u32, seed: i64) -> ShardState {
    let (params, optimizer) = model_state(seed);
    ShardState {
        step,
        tp_rank,
        tp_size,
        writer: true,
        tensors: shard(&params, tp_rank.into(), tp_size.into()),
        optimizer: shard(&optimizer, tp_rank.into(), tp_size.into()),
        meta: json!({ "step": step, "sampler": { "position": step * 8 }, "attempt": "t" }),
    }
}

fn open(url: &str, keep: usize) -> Checkpointer {
    let mut options = CheckpointOptions::new(url);
    options.keep = keep;
    Checkpointer::open(options).unwrap()
}

fn save_all(ck: &Checkpointer, s: ShardState) -> SaveStatus {
    let ticket = ck.save(s).unwrap();
    ticket.wait().status
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ckpt", dir.path().display());
    let ck = open(&url, 0);
    assert!(ck.latest().unwrap().is_none());
    let mut s = state(10, 0, 1, 1);
    // A save over 64 MiB, with a tensor that is not a whole number of MiB:
    // staged by a streaming copy, its checksum computed piece by piece as
    // the file is written.
    s.optimizer.push((
        "big.exp_avg".into(),
        Tensor::arange(17_000_003, (tch::Kind::Float, tch::Device::Cpu)).sin(),
    ));
    let (params, optimizer, meta) = (copy(&s.tensors), copy(&s.optimizer), s.meta.clone());
    let ticket = ck.save(s).unwrap();
    let outcomes = ck.flush().unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].status, SaveStatus::Committed);
    assert_eq!(ticket.outcome().unwrap(), outcomes[0]);
    assert!(outcomes[0].bytes > 0);

    let folder = dir.path().join("ckpt/step-00000010");
    let mut files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "manifest.json",
            "meta.json",
            "optim-tp-00-of-01.safetensors",
            "part-tp-00-of-01.json",
            "tp-00-of-01.safetensors"
        ]
    );
    // The shard is a plain safetensors file that libtorch's reader takes.
    let read = Tensor::read_safetensors(folder.join("tp-00-of-01.safetensors")).unwrap();
    assert_eq!(read.len(), params.len());

    let info = ck.latest().unwrap().unwrap();
    assert_eq!((info.step, info.tp_size), (10, 1));
    assert!(info.url.ends_with("/ckpt/step-00000010"), "{}", info.url);
    let loaded = ck.load(&info, 0, 1).unwrap();
    assert_eq!(loaded.step, 10);
    assert_same(&loaded.tensors, &params);
    assert_same(&loaded.optimizer, &optimizer);
    assert_eq!(loaded.meta, meta);
    // Every file's bytes against the checksum its manifest records.
    ck.verify(&info).unwrap();

    // A second Checkpointer on the same folder, by plain path, sees it too.
    let again = open(dir.path().join("ckpt").to_str().unwrap(), 0);
    let listed = again.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest, info.manifest);
}

/// A lending save to a local folder commits the tensors as they were when
/// it was called, though the trainer writes them the moment it takes them
/// back: at once (settling copies what the upload has not read yet), once
/// the upload has read them all (settling copies nothing), or by dropping
/// the loan.
#[test]
fn a_lending_save_commits_the_tensors_as_lent_whenever_they_are_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ckpt", dir.path().display());
    let ck = open(&url, 0);
    for (step, when) in [(1, "at once"), (2, "after the upload"), (3, "dropped")] {
        let mut s = state(step, 0, 1, step as i64);
        // Tensors of several MiB, lent; the small ones are copied.
        s.tensors
            .push(("big.weight".into(), values(&[3000, 1001], step as i64, 7)));
        s.optimizer.push((
            "exp_avg.big.weight".into(),
            values(&[3000, 1001], step as i64, 8),
        ));
        let (params, optimizer) = (copy(&s.tensors), copy(&s.optimizer));
        let live: Vec<Tensor> = s
            .tensors
            .iter()
            .chain(&s.optimizer)
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let (ticket, loan) = ck.save_lending(s).unwrap();
        let lent = loan.bytes();
        assert_eq!(lent, 2 * 4 * 3000 * 1001, "{when}: the large tensors");
        match when {
            "at once" => {
                let settled = loan.settle();
                assert!(settled.copied <= lent, "{when}");
                assert!(
                    ticket.staging() >= settled.took,
                    "{when}: settling blocked too"
                );
            }
            "after the upload" => {
                ticket.wait();
                assert_eq!(loan.settle().copied, 0, "{when}");
            }
            _ => drop(loan),
        }
        // The trainer's next update writes every tensor.
        for t in &live {
            let _ = t.shallow_clone().fill_(-3);
        }
        assert_eq!(ticket.wait().status, SaveStatus::Committed, "{when}");
        let info = ck.latest().unwrap().unwrap();
        assert_eq!(info.step, step);
        let loaded = ck.load(&info, 0, 1).unwrap();
        assert_same(&loaded.tensors, &params);
        assert_same(&loaded.optimizer, &optimizer);
        ck.verify(&info).unwrap();
    }
}

#[test]
fn the_manifest_is_the_commit_point_and_checksums_guard_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().to_str().unwrap(), 0);
    for step in [10, 20, 30] {
        assert_eq!(
            save_all(&ck, state(step, 0, 1, step as i64)),
            SaveStatus::Committed
        );
    }
    assert_eq!(ck.latest().unwrap().unwrap().step, 30);

    // Step 30's shard loses a byte's worth of bits, its size unchanged.
    let shard = dir.path().join("step-00000030/tp-00-of-01.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&shard, &bytes).unwrap();
    let list = ck.list().unwrap();
    let thirty = list.iter().find(|c| c.step == 30).unwrap();
    match ck.verify(thirty) {
        Err(CheckpointError::Checksum { path, .. }) => assert!(
            path.ends_with("step-00000030/tp-00-of-01.safetensors"),
            "{path}"
        ),
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    // latest() reads no bytes: 30 is there at its sizes. Its load finds
    // the damage, and the one before it is 20.
    assert_eq!(ck.latest().unwrap().unwrap().step, 30);
    assert!(matches!(
        ck.load(thirty, 0, 1),
        Err(CheckpointError::Checksum { .. })
    ));
    assert_eq!(ck.latest_before(30).unwrap().unwrap().step, 20);

    // Without its manifest, step 20 does not exist.
    std::fs::remove_file(dir.path().join("step-00000020/manifest.json")).unwrap();
    let steps: Vec<u64> = ck.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [10, 30]);
    let latest = ck.latest_before(30).unwrap().unwrap();
    assert_eq!(latest.step, 10);
    let (params, _) = model_state(10);
    assert_same(&ck.load(&latest, 0, 1).unwrap().tensors, &params);

    // A truncated file is caught by its size.
    let shard = dir
        .path()
        .join("step-00000010/optim-tp-00-of-01.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 8]).unwrap();
    assert!(matches!(
        ck.verify(&latest),
        Err(CheckpointError::Size { .. })
    ));
    assert!(matches!(
        ck.load(&latest, 0, 1),
        Err(CheckpointError::Size { .. })
    ));
    assert!(ck.latest_before(30).unwrap().is_none());
}

#[test]
fn retention_keeps_the_newest_k_and_sweeps_torn_saves() {
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().to_str().unwrap(), 2);
    for step in 1..=3 {
        assert_eq!(save_all(&ck, state(step, 0, 1, 0)), SaveStatus::Committed);
    }
    // A tp-2 save whose rank 1 never uploads: not committed after the timeout.
    let torn = Checkpointer::open_with(
        CheckpointOptions::new(dir.path().to_str().unwrap()),
        CheckpointTuning {
            commit_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(50),
            ..CheckpointTuning::default()
        },
    )
    .unwrap();
    match save_all(&torn, state(4, 0, 2, 0)) {
        SaveStatus::Failed(message) => assert!(message.contains("[1]"), "{message}"),
        other => panic!("a save missing rank 1 committed: {other:?}"),
    }
    // Rank 0 removed what it wrote; a file of a rank that died mid-save
    // stays until retention sweeps the folder.
    let folder = dir.path().join("step-00000004");
    assert!(!folder.join("tp-00-of-02.safetensors").exists());
    assert!(!folder.join("meta.json").exists());
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("tp-01-of-02.safetensors"), b"torn").unwrap();
    assert_eq!(ck.latest().unwrap().unwrap().step, 3);

    for step in 5..=6 {
        assert_eq!(save_all(&ck, state(step, 0, 1, 0)), SaveStatus::Committed);
    }
    let steps: Vec<u64> = ck.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [5, 6]);
    let mut folders: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    folders.sort();
    assert_eq!(folders, ["step-00000005", "step-00000006"]);
}

/// The scenario that once lost every good checkpoint: 30 and 40 damaged,
/// a run resumed from 20 saves 25 with `keep = 2`. Only checkpoints that
/// verify count: 25 and 20 stay, 10 goes, the damaged ones are left alone,
/// and the next resume finds 25.
#[test]
fn retention_keeps_good_checkpoints_when_newer_ones_are_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let all = open(url, 0);
    for step in [10, 20, 30, 40] {
        assert_eq!(save_all(&all, state(step, 0, 1, 0)), SaveStatus::Committed);
    }
    for step in [30, 40] {
        let shard = dir
            .path()
            .join(format!("step-{step:08}/tp-00-of-01.safetensors"));
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&shard, &bytes).unwrap();
    }
    assert_eq!(resumable(&all), 20);

    let resumed = open(url, 2);
    assert_eq!(
        save_all(&resumed, state(25, 0, 1, 0)),
        SaveStatus::Committed
    );
    let steps: Vec<u64> = resumed.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [20, 25, 30, 40]);
    assert_eq!(resumable(&resumed), 25);
}

/// Retention checks the checkpoints it keeps, but reads back none of the
/// files this process wrote that are still at the version the store gave
/// them: a change in place (which moves the modification time) is read
/// and found; damage that keeps size and time, as a disk's own rot would,
/// is left to the load, which falls back past it.
#[test]
fn retention_reads_back_only_what_changed_since_this_process_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let ck = open(url, 2);
    let shard = |step: u64| {
        dir.path()
            .join(format!("step-{step:08}/tp-00-of-01.safetensors"))
    };
    let flip = |step: u64, keep_time: bool| {
        let path = shard(step);
        let modified = path.metadata().unwrap().modified().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        if keep_time {
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(modified).unwrap();
        }
    };
    for step in [10, 20] {
        assert_eq!(save_all(&ck, state(step, 0, 1, 0)), SaveStatus::Committed);
    }
    // Not read back: counted as whole, and step 10 goes.
    flip(20, true);
    assert_eq!(save_all(&ck, state(30, 0, 1, 0)), SaveStatus::Committed);
    let steps: Vec<u64> = ck.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [20, 30]);
    // Changed in place: read back, found damaged, neither counted nor
    // deleted; step 20 (checked at the last save) stays.
    std::thread::sleep(Duration::from_millis(5));
    flip(30, false);
    assert_eq!(save_all(&ck, state(40, 0, 1, 0)), SaveStatus::Committed);
    let steps: Vec<u64> = ck.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [20, 30, 40]);
    // A load finds both: 40 loads; 30 and 20 do not.
    let info = |step: u64| {
        ck.list()
            .unwrap()
            .into_iter()
            .find(|c| c.step == step)
            .unwrap()
    };
    assert!(ck.load(&info(40), 0, 1).is_ok());
    for step in [30, 20] {
        let err = ck.load(&info(step), 0, 1).unwrap_err();
        assert!(err.is_corrupt(), "{err}");
    }
}

/// The checkpoint a resume ends on: the newest that loads, falling back
/// past those whose load finds damage, as the trainer does.
fn resumable(ck: &Checkpointer) -> u64 {
    let mut next = ck.latest().unwrap();
    while let Some(info) = next {
        match ck.load(&info, 0, 1) {
            Ok(_) => return info.step,
            Err(e) if e.is_corrupt() => next = ck.latest_before(info.step).unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no checkpoint loads")
}

/// Saves the model state of `seed` at tp size `size` (one Checkpointer per
/// rank, as in a real job) and returns the committed checkpoint.
fn save_sharded(url: &str, step: u64, size: u32, seed: i64) {
    let ranks: Vec<Checkpointer> = (0..size).map(|_| open(url, 0)).collect();
    // Rank 0 first: its commit waits for the others' parts.
    let tickets: Vec<_> = ranks
        .iter()
        .enumerate()
        .map(|(r, ck)| ck.save(state(step, r as u32, size, seed)).unwrap())
        .collect();
    for (r, t) in tickets.iter().enumerate() {
        let expected = if r == 0 {
            SaveStatus::Committed
        } else {
            SaveStatus::Uploaded
        };
        assert_eq!(t.wait().status, expected, "rank {r}");
    }
}

#[test]
fn checkpoints_reshard_between_tensor_parallel_sizes() {
    let (params, optimizer) = model_state(7);
    for (saved, loaded) in [(2u32, 1u32), (1, 2), (2, 4), (4, 2), (2, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap();
        save_sharded(url, 5, saved, 7);
        let ck = open(url, 0);
        let info = ck.latest().unwrap().unwrap();
        assert_eq!(info.tp_size, saved);
        let mut full_params: Vec<Vec<(String, Tensor)>> = Vec::new();
        for rank in 0..loaded {
            let state = ck.load(&info, rank, loaded).unwrap();
            assert_eq!(state.meta["sampler"]["position"], 40);
            assert_same(&state.tensors, &shard(&params, rank.into(), loaded.into()));
            assert_same(
                &state.optimizer,
                &shard(&optimizer, rank.into(), loaded.into()),
            );
            full_params.push(state.tensors);
        }
        // The split tensors really are split.
        let q = &full_params[0][0].1;
        assert_eq!(q.size(), [8 / loaded as i64, 4], "{saved} -> {loaded}");
    }
}

#[test]
fn a_split_that_does_not_divide_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    save_sharded(url, 1, 1, 0);
    let ck = open(url, 0);
    let info = ck.latest().unwrap().unwrap();
    match ck.load(&info, 0, 3) {
        Err(CheckpointError::Tensor { name, message }) => {
            assert!(
                name.contains("q_proj") && message.contains("3"),
                "{name}: {message}"
            )
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
    assert!(matches!(
        ck.load(&info, 2, 2),
        Err(CheckpointError::Rank { .. })
    ));
}

#[test]
fn only_writers_upload_and_bad_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().to_str().unwrap(), 0);
    let mut s = state(3, 0, 1, 0);
    s.writer = false;
    let ticket = ck.save(s).unwrap();
    assert_eq!(ticket.outcome().unwrap().status, SaveStatus::Skipped);
    assert_eq!(ck.flush().unwrap()[0].status, SaveStatus::Skipped);
    assert!(ck.list().unwrap().is_empty());
    let mut bad = state(3, 0, 1, 0);
    bad.tp_rank = 1;
    assert!(matches!(
        ck.save(bad),
        Err(CheckpointError::Rank {
            tp_rank: 1,
            tp_size: 1
        })
    ));
}

/// A store that answers the same whatever the number of attempts (here a
/// step folder's path runs through a file) fails the save at the first,
/// removes what it wrote and lets the next save commit.
#[test]
fn a_permanent_local_error_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().to_str().unwrap(), 0);
    std::fs::write(dir.path().join("step-00000005"), b"a file, not a folder").unwrap();
    let outcome = ck.save(state(5, 0, 1, 0)).unwrap().wait();
    match &outcome.status {
        SaveStatus::Failed(message) => assert!(message.contains("Not a directory"), "{message}"),
        other => panic!("a save through a file: {other:?}"),
    }
    assert_eq!(outcome.retries, 0);
    assert_eq!(save_all(&ck, state(6, 0, 1, 0)), SaveStatus::Committed);
    assert_eq!(ck.latest().unwrap().unwrap().step, 6);
}

/// A local location keeps the shard files retention removes and writes the
/// next save into them: the third save of three (`keep = 1`) lands in the
/// first's files (the same inodes), trimmed to its own sizes, and loads
/// back bit for bit; what no save took goes at the next retention.
#[test]
fn local_saves_write_into_the_files_retention_removed() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let ck = open(root.to_str().unwrap(), 1);
    // Big enough to be worth recycling: 2 MiB of parameters.
    let big = |step: u64, seed: i64, rows: i64| ShardState {
        tensors: vec![(
            "w".to_owned(),
            Tensor::full(
                [rows, 1024],
                seed as f64,
                (tch::Kind::Float, tch::Device::Cpu),
            ),
        )],
        optimizer: Vec::new(),
        ..state(step, 0, 1, seed)
    };
    let params = |step: u64| root.join(format!("step-{step:08}/tp-00-of-01.safetensors"));
    assert_eq!(save_all(&ck, big(1, 1, 512)), SaveStatus::Committed);
    let first = std::fs::metadata(params(1)).unwrap().ino();
    assert_eq!(save_all(&ck, big(2, 2, 512)), SaveStatus::Committed);
    assert!(!root.join("step-00000001").exists());
    let bin: Vec<u64> = std::fs::read_dir(root.join(".recycled"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().ino())
        .collect();
    assert_eq!(bin, [first], "step 1's parameters wait in the bin");

    // A smaller save: step 1's file, trimmed.
    let third = big(3, 3, 256);
    let expected = copy(&third.tensors);
    assert_eq!(save_all(&ck, third), SaveStatus::Committed);
    let written = std::fs::metadata(params(3)).unwrap();
    assert_eq!(written.ino(), first);
    let info = ck.latest().unwrap().unwrap();
    assert_eq!(info.step, 3);
    assert_same(&ck.load(&info, 0, 1).unwrap().tensors, &expected);
    ck.verify(&info).unwrap();
    // Step 2's file went to the bin; the next retention empties what is
    // still there before keeping the newly removed.
    let bin = std::fs::read_dir(root.join(".recycled")).unwrap().count();
    assert_eq!(bin, 1);
    let steps: Vec<u64> = ck.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [3]);

    // A hard-linked backup of step 3's file is never written into.
    let backup = dir.path().join("backup.safetensors");
    std::fs::hard_link(params(3), &backup).unwrap();
    let before = std::fs::read(&backup).unwrap();
    assert_eq!(save_all(&ck, big(4, 4, 256)), SaveStatus::Committed);
    assert_eq!(save_all(&ck, big(5, 5, 256)), SaveStatus::Committed);
    assert_eq!(std::fs::read(&backup).unwrap(), before);
    assert_ne!(std::fs::metadata(params(5)).unwrap().ino(), first);
}

/// GPU tensors stage into page-locked memory (their checksum computed by
/// the upload): the checkpoint of tensors of several dtypes loads back bit
/// for bit, into CPU memory and straight onto the GPU (through a bounce
/// buffer that tensors of over 4 MiB fill several times), and verifies,
/// save after save.
#[test]
fn gpu_tensors_round_trip_through_pinned_staging() {
    if !samtrain_torchext::cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let gpu = tch::Device::Cuda(0);
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().join("ckpt").to_str().unwrap(), 1);
    for step in 1..=3u64 {
        let mut s = state(step, 0, 1, step as i64);
        s.tensors.push((
            "half".to_owned(),
            Tensor::randn([300, 7], (tch::Kind::BFloat16, gpu)),
        ));
        s.tensors.push((
            "strided".to_owned(),
            Tensor::randn([64, 32], (tch::Kind::Float, gpu)).transpose(0, 1),
        ));
        s.tensors.push((
            "big".to_owned(),
            Tensor::randn([1_300_001], (tch::Kind::Double, gpu)),
        ));
        s.tensors = s
            .tensors
            .into_iter()
            .map(|(n, t)| (n, t.to_device(gpu)))
            .collect();
        s.optimizer = s
            .optimizer
            .into_iter()
            .map(|(n, t)| (n, t.to_device(gpu)))
            .collect();
        let expected: Vec<(String, Tensor)> = s
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu)))
            .collect();
        assert_eq!(save_all(&ck, s), SaveStatus::Committed);
        let info = ck.latest().unwrap().unwrap();
        assert_eq!(info.step, step);
        assert_same(&ck.load(&info, 0, 1).unwrap().tensors, &expected);
        let onto = ck.load_onto(&info, 0, 1, gpu).unwrap().tensors;
        assert!(onto.iter().all(|(_, t)| t.device() == gpu));
        let back: Vec<(String, Tensor)> = onto
            .into_iter()
            .map(|(n, t)| (n, t.to_device(tch::Device::Cpu)))
            .collect();
        assert_same(&back, &expected);
        ck.verify(&info).unwrap();
    }
}

/// A sound checkpoint whose tensors a device cannot take (here a GPU that
/// is not there, as a GPU out of memory would be) fails naming the file,
/// the tensor and the device, and is not taken for damage: a resume must
/// not fall back to an older checkpoint that would fail the same way.
#[test]
fn a_device_that_cannot_take_the_tensors_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let ck = open(dir.path().join("ckpt").to_str().unwrap(), 1);
    assert_eq!(save_all(&ck, state(5, 0, 1, 1)), SaveStatus::Committed);
    let info = ck.latest().unwrap().unwrap();
    let error = match ck.load_onto(&info, 0, 1, tch::Device::Cuda(63)) {
        Err(e) => e,
        Ok(_) => panic!("loaded onto a GPU 63"),
    };
    assert!(
        matches!(
            error,
            samtrain_checkpoint::CheckpointError::Placement { .. }
        ),
        "{error}"
    );
    assert!(!error.is_corrupt(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("tp-00-of-01.safetensors: tensor ") && message.contains("onto Cuda(63): "),
        "{message}"
    );
    assert_eq!(
        message.lines().count(),
        1,
        "libtorch's first line only: {message}"
    );
    // The same checkpoint loads where it can.
    ck.load(&info, 0, 1).unwrap();
}
