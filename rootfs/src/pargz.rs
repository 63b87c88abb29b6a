//! Parallel gzip, pigz-style: one gzip member whose deflate stream is compressed in
//! blocks on several threads, with the same bytes whatever the thread count, and with
//! compressed blocks that can be reused from a [`PieceCache`] across builds.
//!
//! The input is a sequence of *segments* (the packer cuts one at every store path, see
//! [`ParGzEncoder::cut`]); each segment is cut into blocks of [`BLOCK_SIZE`] bytes (a
//! constant, never derived from the number of cores), and its last block may be shorter.
//! Each block is compressed as raw deflate by a fresh compressor primed with the previous
//! block's last 32 KiB *of the same segment* as its dictionary, so matches reach back across
//! cuts inside a segment as they would in one stream, while the first block of a segment
//! depends on nothing before it. Every block ends with a sync flush (an empty stored block,
//! which byte-aligns the stream), and [`ParGzEncoder::finish`] adds an empty final block. The
//! pieces concatenate into one valid deflate stream, wrapped in a fixed gzip header (no name,
//! mtime 0, OS 255) and a trailer with the CRC32 and length of the raw data.
//!
//! A block's compressed bytes depend only on its data, its dictionary and the level, so they
//! are the same whether it was compressed inline (one thread), on any worker, or taken from
//! the cache (which is keyed by exactly those inputs). Because a segment starts without a
//! dictionary, a package that changes moves no block boundary and changes no dictionary in
//! any other segment: everything else comes out of the cache. The blocks are written in input
//! order by the calling thread; at most two blocks per thread are in flight, so memory stays
//! bounded whatever the input size.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::mem;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

use crate::piececache::PieceCache;

/// Uncompressed bytes per block. Part of the output format: changing it changes the bytes.
pub const BLOCK_SIZE: usize = 1 << 20;
/// Deflate's window: the dictionary each block gets from the one before.
const DICT_SIZE: usize = 32 * 1024;
/// Blocks in flight per worker thread (queued, being compressed, or waiting to be written).
const IN_FLIGHT_PER_THREAD: usize = 2;

/// A block's compressed bytes, and its input buffer back for reuse.
type Reply = io::Result<(Vec<u8>, Vec<u8>)>;

struct Job {
    data: Vec<u8>,
    dict: Vec<u8>,
    reply: SyncSender<Reply>,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

/// A gzip writer that compresses on `threads` threads; see the module docs.
/// Call [`ParGzEncoder::finish`] to end the stream; dropping it leaves the stream unfinished.
pub struct ParGzEncoder<W: Write> {
    out: Option<W>,
    level: u32,
    /// The block being filled.
    block: Vec<u8>,
    /// The last [`DICT_SIZE`] bytes of the previous block of this segment; empty at the
    /// start of a segment.
    dict: Vec<u8>,
    /// Where compressed blocks are looked up and stored, if anywhere.
    cache: Option<Arc<PieceCache>>,
    crc: crc32fast::Hasher,
    header_written: bool,
    /// `None`: compress inline on the calling thread.
    pool: Option<Pool>,
    /// Replies of submitted blocks, oldest first.
    pending: VecDeque<Receiver<Reply>>,
    max_pending: usize,
    /// Input buffers of written blocks, for reuse.
    spare: Vec<Vec<u8>>,
}

impl<W: Write> ParGzEncoder<W> {
    /// A gzip encoder at `level` (0–9) using `threads` threads (1: no extra thread at all).
    pub fn new(out: W, level: u32, threads: usize) -> io::Result<Self> {
        Self::with_cache(out, level, threads, None)
    }

    /// Like [`ParGzEncoder::new`], taking compressed blocks from `cache` when it has them and
    /// storing the others there. The output is the same with or without a cache.
    pub fn with_cache(
        out: W,
        level: u32,
        threads: usize,
        cache: Option<Arc<PieceCache>>,
    ) -> io::Result<Self> {
        let threads = threads.max(1);
        let pool = if threads == 1 {
            None
        } else {
            Some(Pool::start(level, threads, cache.clone())?)
        };
        Ok(ParGzEncoder {
            out: Some(out),
            level,
            block: Vec::with_capacity(BLOCK_SIZE),
            dict: Vec::new(),
            cache,
            crc: crc32fast::Hasher::new(),
            header_written: false,
            pool,
            pending: VecDeque::new(),
            max_pending: threads * IN_FLIGHT_PER_THREAD,
            spare: Vec::new(),
        })
    }

    /// Compresses what is left, writes the final block and the trailer, and returns the
    /// inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.cut()?;
        while !self.pending.is_empty() {
            self.collect_one()?;
        }
        // The final block: BFINAL set, fixed Huffman codes, just the end-of-block code.
        self.emit(&[0x03, 0x00])?;
        // ISIZE is the input length modulo 2^32 (RFC 1952).
        let size = self.crc.total_len() as u32;
        let crc = self.crc.clone().finalize();
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&crc.to_le_bytes());
        trailer[4..].copy_from_slice(&size.to_le_bytes());
        let mut out = self.out.take().expect("the writer is only taken here");
        out.write_all(&trailer)?;
        out.flush()?;
        Ok(out)
    }

    /// Ends the current segment: what is buffered becomes a (possibly short) block, and the
    /// next block starts without a dictionary. Cutting with nothing buffered does nothing.
    pub fn cut(&mut self) -> io::Result<()> {
        if !self.block.is_empty() {
            self.submit()?;
        }
        self.dict.clear();
        Ok(())
    }

    /// Hands the current block to a worker (or compresses it here with one thread).
    fn submit(&mut self) -> io::Result<()> {
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE));
        let data = mem::replace(&mut self.block, fresh);
        let dict = mem::replace(
            &mut self.dict,
            data[data.len().saturating_sub(DICT_SIZE)..].to_vec(),
        );
        if self.pool.is_none() {
            let compressed = piece(self.level, &dict, &data, self.cache.as_deref())?;
            self.emit(&compressed)?;
            self.recycle(data);
            return Ok(());
        }
        while self.pending.len() >= self.max_pending {
            self.collect_one()?;
        }
        let jobs = self.pool.as_ref().and_then(|p| p.jobs.as_ref());
        let jobs = jobs.expect("the job queue lives until drop");
        let (reply, receiver) = mpsc::sync_channel(1);
        jobs.send(Job { data, dict, reply })
            .map_err(|_| worker_gone())?;
        self.pending.push_back(receiver);
        Ok(())
    }

    /// Waits for the oldest block in flight and writes it.
    fn collect_one(&mut self) -> io::Result<()> {
        let Some(receiver) = self.pending.pop_front() else {
            return Ok(());
        };
        let (compressed, data) = receiver.recv().map_err(|_| worker_gone())??;
        self.emit(&compressed)?;
        self.recycle(data);
        Ok(())
    }

    fn recycle(&mut self, mut data: Vec<u8>) {
        if self.spare.len() < 2 {
            data.clear();
            self.spare.push(data);
        }
    }

    /// Writes compressed bytes, after the gzip header the first time.
    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .expect("the writer is only taken by finish");
        if !self.header_written {
            out.write_all(&header(self.level))?;
            self.header_written = true;
        }
        out.write_all(bytes)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(BLOCK_SIZE - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.block.len() == BLOCK_SIZE {
            self.submit()?;
        }
        Ok(n)
    }

    /// Writes the blocks already compressed and flushes the inner writer. The block being
    /// filled stays buffered: cutting it short would move every later block boundary (only
    /// [`ParGzEncoder::cut`] ends a block early).
    fn flush(&mut self) -> io::Result<()> {
        while let Some(Ok(reply)) = self.pending.front().map(|r| r.try_recv()) {
            self.pending.pop_front();
            let (compressed, data) = reply?;
            self.emit(&compressed)?;
            self.recycle(data);
        }
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl<W: Write> Drop for ParGzEncoder<W> {
    fn drop(&mut self) {
        // Replies nobody will read: workers notice the closed channel and carry on.
        self.pending.clear();
        if let Some(pool) = &mut self.pool {
            pool.stop();
        }
    }
}

impl Pool {
    fn start(level: u32, threads: usize, cache: Option<Arc<PieceCache>>) -> io::Result<Pool> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        let mut pool = Pool {
            jobs: Some(jobs),
            workers: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let queue = Arc::clone(&queue);
            let cache = cache.clone();
            let worker = std::thread::Builder::new()
                .name(format!("bonsai-gzip-{i}"))
                .spawn(move || work(level, &queue, cache.as_deref()));
            match worker {
                Ok(handle) => pool.workers.push(handle),
                Err(e) => {
                    pool.stop();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    /// Closes the queue and waits for every worker to finish its current block.
    fn stop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn work(level: u32, queue: &Mutex<Receiver<Job>>, cache: Option<&PieceCache>) {
    loop {
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let reply =
            piece(level, &job.dict, &job.data, cache).map(|compressed| (compressed, job.data));
        // The encoder may have been dropped meanwhile; then nobody wants the block.
        let _ = job.reply.send(reply);
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("a gzip worker thread stopped")
}

/// The 10-byte gzip header: deflate, no flags, mtime 0, XFL as flate2 sets it, OS 255.
fn header(level: u32) -> [u8; 10] {
    let xfl = match level {
        9.. => 2,
        0 | 1 => 4,
        _ => 0,
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]
}

/// One block's compressed bytes: from the cache when it holds them (checked), else
/// compressed here and stored there.
fn piece(level: u32, dict: &[u8], data: &[u8], cache: Option<&PieceCache>) -> io::Result<Vec<u8>> {
    let Some(cache) = cache else {
        return compress_block(level, dict, data);
    };
    let key = cache.key(level, dict, data);
    if let Some(bytes) = cache.get(&key, data.len()) {
        return Ok(bytes);
    }
    let bytes = compress_block(level, dict, data)?;
    cache.put(&key, &bytes, data.len());
    Ok(bytes)
}

/// One block as raw deflate, primed with `dict`, ending byte-aligned with a sync flush.
pub(crate) fn compress_block(level: u32, dict: &[u8], data: &[u8]) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        if out.len() == out.capacity() {
            out.reserve((out.capacity() / 2).max(64 * 1024));
        }
        let consumed = usize::try_from(c.total_in()).expect("a block fits in memory");
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // A sync flush is complete once all input is in and output space is left over.
        let done = match status {
            Status::StreamEnd => true,
            Status::Ok | Status::BufError => {
                c.total_in() == data.len() as u64 && out.len() < out.capacity()
            }
        };
        if done {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::{Command, Stdio};

    /// Deterministic, mildly compressible bytes (a cpio-like mix of text and noise).
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let words: [&[u8]; 6] = [
            b"nix/store/",
            b"lib",
            b".so.6",
            b"bin/",
            b"\0\0\0\0",
            b"usr",
        ];
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 < 2 {
                out.extend_from_slice(words[(x >> 8) as usize % words.len()]);
            } else {
                out.push((x >> 24) as u8);
            }
        }
        out.truncate(len);
        out
    }

    fn gz(data: &[u8], level: u32, threads: usize, chunk: usize) -> Vec<u8> {
        let mut enc = ParGzEncoder::new(Vec::new(), level, threads).unwrap();
        for piece in data.chunks(chunk.max(1)) {
            enc.write_all(piece).unwrap();
        }
        enc.flush().unwrap();
        enc.finish().unwrap()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(gz)
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    fn gnu_gunzip(gz: &[u8]) -> Vec<u8> {
        let mut child = Command::new("gzip")
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("GNU gzip is installed (apt-get install gzip)");
        let mut stdin = child.stdin.take().unwrap();
        let input = gz.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(out.status.success(), "gzip -dc failed");
        out.stdout
    }

    #[test]
    fn same_bytes_for_any_thread_count_and_write_pattern() {
        // Three and a half blocks, so there are full blocks, a cut and a short last block.
        let data = sample(BLOCK_SIZE * 3 + BLOCK_SIZE / 2);
        let one = gz(&data, 9, 1, 64 * 1024);
        for (threads, chunk) in [(2, 1000), (4, BLOCK_SIZE * 2), (3, 4096), (1, 777)] {
            assert!(
                gz(&data, 9, threads, chunk) == one,
                "{threads} threads, writes of {chunk} bytes"
            );
        }
        assert_eq!(gunzip(&one), data);
        assert_eq!(gnu_gunzip(&one), data);
        // One gzip member: the single-member decoder reads all of it, and the header is fixed.
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        assert_eq!(&one[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
    }

    #[test]
    fn block_boundaries_and_empty_input() {
        for len in [
            0,
            1,
            DICT_SIZE,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
            2 * BLOCK_SIZE,
        ] {
            let data = sample(len);
            let one = gz(&data, 9, 1, 100_000);
            assert!(gz(&data, 9, 2, 100_000) == one, "{len} bytes");
            assert_eq!(gunzip(&one), data, "{len} bytes");
            assert_eq!(gnu_gunzip(&one), data, "{len} bytes");
        }
    }

    #[test]
    fn every_level_round_trips() {
        let data = sample(BLOCK_SIZE + 5000);
        for level in 0..=9 {
            let one = gz(&data, level, 1, 65536);
            assert!(gz(&data, level, 2, 65536) == one, "level {level}");
            assert_eq!(gunzip(&one), data, "level {level}");
            assert_eq!(one[8], header(level)[8]);
        }
    }

    #[test]
    fn the_dictionary_keeps_matches_across_blocks() {
        // Two identical blocks of noise: the second compresses to almost nothing only if
        // matches reach back into the first.
        let mut x: u32 = 1;
        // (zlib matches reach at most 32 KiB - 262 bytes back, hence 20 KiB.)
        let noise: Vec<u8> = (0..20 * 1024)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        let mut data = vec![0u8; BLOCK_SIZE - noise.len()];
        data.extend_from_slice(&noise);
        data.extend_from_slice(&noise);
        let packed = gz(&data, 9, 2, 65536);
        assert!(packed.len() < noise.len() + 4096, "{} bytes", packed.len());
        assert_eq!(gunzip(&packed), data);
    }

    /// A writer that fails after `limit` bytes.
    struct Failing {
        limit: usize,
    }
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.limit == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(self.limit);
            self.limit -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_errors_surface_and_dropping_midway_stops_the_workers() {
        let data = sample(BLOCK_SIZE * 3);
        for threads in [1, 2] {
            let mut enc = ParGzEncoder::new(Failing { limit: 100 }, 6, threads).unwrap();
            let result = enc.write_all(&data).and_then(|()| enc.finish().map(drop));
            assert_eq!(result.unwrap_err().to_string(), "disk full");
        }
        let mut enc = ParGzEncoder::new(Vec::new(), 9, 4).unwrap();
        enc.write_all(&data).unwrap();
        drop(enc);
    }
}
