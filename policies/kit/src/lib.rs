//! Pure placement machinery shared by the shipped policies: a policy supplies a ranking, the kit
//! does the rest (fit checks, in-batch accounting, deterministic tie-breaks, reasons). For
//! admission policies, [`AdmissionPolicy`] and the plain views of a task and its user's usage.
//!
//! Nothing here knows about WebAssembly: inputs are plain slices (one per column, as the WIT
//! contract passes them), the output is one [`Decision`] per task, so every policy's logic is
//! unit-tested natively. The `placement_component!` and `admission_component!` macros are the
//! WebAssembly glue, written once for every policy crate.
//!
//! Contract 0.2.0 adds preemption: [`place_preempting`] (in `preempt`) may answer
//! [`PreemptingDecision::Preempt`], and `preempting_placement_component!` is its glue against
//! `wit/0.2.0`. The 0.1.0 API ([`Decision`], [`place`], `placement_component!`) is unchanged.

mod admission;
mod preempt;

pub use admission::{Admission, AdmissionPolicy, Submission, Usage};
pub use preempt::{PreemptingDecision, Running, place_preempting};

/// The four resources, in the order used by every `[f64; 4]` in this crate.
pub const RESOURCES: [Resource; 4] = [
    Resource::Cpu,
    Resource::Memory,
    Resource::Storage,
    Resource::Gpu,
];

/// One of the four resources a task requests and a worker offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// CPU cores.
    Cpu,
    /// Memory, GB.
    Memory,
    /// Storage, GB.
    Storage,
    /// GPU devices.
    Gpu,
}

impl Resource {
    /// How an amount of this resource reads in a reason: `4 CPU`, `2.5 GB memory`.
    pub fn describe(self, amount: f64) -> String {
        let n = fmt_amount(amount);
        match self {
            Resource::Cpu => format!("{n} CPU"),
            Resource::Memory => format!("{n} GB memory"),
            Resource::Storage => format!("{n} GB storage"),
            Resource::Gpu => format!("{n} GPU"),
        }
    }

    /// An amount with its unit only: `4 CPU`, `2.5 GB`, `1 GPU`.
    pub fn describe_short(self, amount: f64) -> String {
        let n = fmt_amount(amount);
        match self {
            Resource::Cpu => format!("{n} CPU"),
            Resource::Memory | Resource::Storage => format!("{n} GB"),
            Resource::Gpu => format!("{n} GPU"),
        }
    }

    /// The resource's name as written in configuration keys and reasons.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Storage => "storage",
            Resource::Gpu => "gpu",
        }
    }
}

/// Formats a non-negative amount with at most two decimals and no trailing zeros (`2.5`, `4`,
/// `0.13`), without pulling float formatting into the guest.
pub fn fmt_amount(x: f64) -> String {
    if !x.is_finite() || x < 0.0 {
        return "?".to_owned();
    }
    // Amounts are multiples of 1/1024, far below 2^53 / 100: the integer path is exact enough.
    let hundredths = (x * 100.0 + 0.5) as u64;
    let (int, frac) = (hundredths / 100, hundredths % 100);
    match frac {
        0 => format!("{int}"),
        f if f % 10 == 0 => format!("{int}.{}", f / 10),
        f => format!("{int}.{f:02}"),
    }
}

/// The decision for one task, mirroring the WIT `placement-decision`.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Run on the worker with this index.
    Assign(u32),
    /// Stay queued, with the reason shown to the user.
    Wait(String),
    /// No candidate worker could ever hold the request.
    Unschedulable(String),
}

/// The workers' columns a placement needs: entry `i` of each slice describes worker `i`.
#[derive(Clone, Copy, Debug)]
pub struct Workers<'a> {
    /// Totals, per resource in [`RESOURCES`] order.
    pub total: [&'a [f64]; 4],
    /// Currently free capacity (`total - allocated`), per resource.
    pub available: [&'a [f64]; 4],
}

/// The tasks' requests: entry `i` of each slice is task `i`'s request.
#[derive(Clone, Copy, Debug)]
pub struct Tasks<'a> {
    /// Requests, per resource in [`RESOURCES`] order.
    pub request: [&'a [f64]; 4],
}

impl Workers<'_> {
    /// How many workers, i.e. the shortest column (a malformed input cannot make us index
    /// past the end of any column).
    pub fn len(&self) -> usize {
        self.total
            .iter()
            .chain(self.available.iter())
            .map(|c| c.len())
            .min()
            .unwrap_or(0)
    }

    /// Whether there are no workers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Tasks<'_> {
    /// How many tasks (the shortest column).
    pub fn len(&self) -> usize {
        self.request.iter().map(|c| c.len()).min().unwrap_or(0)
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A candidate worker as a ranking sees it, with the task already subtracted.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The worker's index.
    pub index: usize,
    /// The worker's totals.
    pub total: [f64; 4],
    /// `1 / total` per resource, `0` where the worker has none: scores multiply rather than
    /// divide in the hot loop, and a resource the worker lacks drops out of them.
    pub inv_total: [f64; 4],
    /// What would stay free on the worker after placing the task (never negative).
    pub remaining: [f64; 4],
}

/// A placement policy's preference among the workers that fit: the host-independent part of a
/// policy. The kit picks the fitting worker with the lowest [`Rank`], lowest index on ties.
pub trait Ranking {
    /// True when every fitting worker ranks the same, so the first fitting one (lowest index)
    /// wins and the scan can stop there.
    const FIRST_MATCH: bool = false;

    /// Ranks placing a task requesting `request` on `candidate`; `None` excludes the worker.
    fn rank(&self, request: &[f64; 4], candidate: &Candidate) -> Option<Rank>;
}

impl<R: Ranking> Ranking for &R {
    const FIRST_MATCH: bool = R::FIRST_MATCH;

    fn rank(&self, request: &[f64; 4], candidate: &Candidate) -> Option<Rank> {
        (**self).rank(request, candidate)
    }
}

/// A worker's rank: compared by `tier` first, then `score`; lower is preferred.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Rank {
    /// Coarse preference class (e.g. GPU workers after non-GPU ones for CPU-only tasks).
    pub tier: u32,
    /// Fine preference within a tier.
    pub score: f64,
}

impl Rank {
    /// A rank in tier 0.
    pub fn score(score: f64) -> Self {
        Rank { tier: 0, score }
    }

    fn better_than(&self, other: &Rank) -> bool {
        self.tier < other.tier || (self.tier == other.tier && self.score < other.score)
    }
}

/// Sum over the resources the worker has (total > 0) of `remaining / total`: how much of the
/// worker stays free after placement, in "worker fractions". Lower is a tighter fit.
pub fn remaining_fraction_sum(c: &Candidate) -> f64 {
    c.remaining[0] * c.inv_total[0]
        + c.remaining[1] * c.inv_total[1]
        + c.remaining[2] * c.inv_total[2]
        + c.remaining[3] * c.inv_total[3]
}

/// Max over the resources the worker has (total > 0) of `allocated / total` after placement:
/// the worker's load on its most loaded resource. Lower is less loaded.
pub fn max_load_after(c: &Candidate) -> f64 {
    let load = |r: usize| (c.total[r] - c.remaining[r]) * c.inv_total[r];
    load(0).max(load(1)).max(load(2)).max(load(3))
}

/// Places every task in order: skips workers that can never hold it (then `unschedulable`),
/// picks among the workers with enough free capacity by `ranking`, and subtracts each
/// assignment from its local copy of the free capacity so that later tasks of the batch see it.
pub fn place<R: Ranking>(workers: &Workers<'_>, tasks: &Tasks<'_>, ranking: &R) -> Vec<Decision> {
    place_each(workers, tasks, |_| ranking)
}

/// [`place`] with a ranking of its own for each task (`ranking_for(task index)`): for
/// policies whose preference depends on the task (its type, its deadline), not only on its
/// request.
pub fn place_each<R: Ranking>(
    workers: &Workers<'_>,
    tasks: &Tasks<'_>,
    mut ranking_for: impl FnMut(usize) -> R,
) -> Vec<Decision> {
    // Row-major copies: one worker's numbers side by side in the hot loop, not in 8 columns.
    let mut rows: Vec<Row> = (0..workers.len())
        .map(|w| {
            let total = row(&workers.total, w);
            Row {
                total,
                inv_total: total.map(|t| if t > 0.0 { 1.0 / t } else { 0.0 }),
                free: row(&workers.available, w),
            }
        })
        .collect();

    (0..tasks.len())
        .map(|t| {
            let request = row(&tasks.request, t);
            let ranking = ranking_for(t);
            let mut best: Option<(Rank, usize)> = None;
            for (w, r) in rows.iter().enumerate() {
                if !fits(&request, &r.free) {
                    continue;
                }
                let candidate = Candidate {
                    index: w,
                    total: r.total,
                    inv_total: r.inv_total,
                    remaining: [
                        r.free[0] - request[0],
                        r.free[1] - request[1],
                        r.free[2] - request[2],
                        r.free[3] - request[3],
                    ],
                };
                if let Some(rank) = ranking.rank(&request, &candidate)
                    && best.as_ref().is_none_or(|(b, _)| rank.better_than(b))
                {
                    best = Some((rank, w));
                    if R::FIRST_MATCH {
                        break;
                    }
                }
            }
            match best {
                Some((_, w)) => {
                    for (f, r) in rows[w].free.iter_mut().zip(request) {
                        *f -= r;
                    }
                    Decision::Assign(w as u32)
                }
                None => {
                    let total: Vec<[f64; 4]> = rows.iter().map(|r| r.total).collect();
                    let free: Vec<[f64; 4]> = rows.iter().map(|r| r.free).collect();
                    no_fit(&request, &total, &free)
                }
            }
        })
        .collect()
}

/// One worker in the hot loop.
struct Row {
    total: [f64; 4],
    inv_total: [f64; 4],
    free: [f64; 4],
}

fn row(columns: &[&[f64]; 4], i: usize) -> [f64; 4] {
    [columns[0][i], columns[1][i], columns[2][i], columns[3][i]]
}

/// Whether `request` fits in `capacity` in all four resources.
pub fn fits(request: &[f64; 4], capacity: &[f64; 4]) -> bool {
    request[0] <= capacity[0]
        && request[1] <= capacity[1]
        && request[2] <= capacity[2]
        && request[3] <= capacity[3]
}

/// The decision for a task no worker takes now: `unschedulable` when no worker's total could
/// ever hold it, `wait` otherwise, each with a reason naming the short resource(s).
pub fn no_fit(request: &[f64; 4], total: &[[f64; 4]], free: &[[f64; 4]]) -> Decision {
    if total.is_empty() {
        // An empty cluster is not a verdict on the task: workers may join.
        return Decision::Wait("no active worker".to_owned());
    }
    if !total.iter().any(|t| fits(request, t)) {
        return Decision::Unschedulable(shortfall(request, total, Capacity::Total));
    }
    if free.iter().any(|f| fits(request, f)) {
        // Room exists, but only on workers the ranking excluded.
        return Decision::Wait(format!(
            "no eligible worker has {} free",
            describe_request(request)
        ));
    }
    Decision::Wait(shortfall(request, free, Capacity::Free))
}

#[derive(Clone, Copy)]
enum Capacity {
    Total,
    Free,
}

/// "no worker has 4 GB memory free (largest free: 2.5 GB)", naming every resource that no
/// worker has enough of, or the whole request when each resource alone exists somewhere.
fn shortfall(request: &[f64; 4], capacity: &[[f64; 4]], kind: Capacity) -> String {
    let (word, largest) = match kind {
        Capacity::Total => ("in total", "largest"),
        Capacity::Free => ("free", "largest free"),
    };
    let short: Vec<String> = RESOURCES
        .iter()
        .enumerate()
        .filter_map(|(r, res)| {
            let max = capacity.iter().map(|c| c[r]).fold(0.0, f64::max);
            (request[r] > max).then(|| {
                format!(
                    "{} {word} ({largest}: {})",
                    res.describe(request[r]),
                    res.describe_short(max)
                )
            })
        })
        .collect();
    if short.is_empty() {
        format!(
            "no single worker has {} {word} at once",
            describe_request(request)
        )
    } else {
        format!("no worker has {}", short.join(", "))
    }
}

/// "2 CPU, 4 GB memory, 1 GPU": the non-zero parts of a request.
pub fn describe_request(request: &[f64; 4]) -> String {
    let parts: Vec<String> = RESOURCES
        .iter()
        .zip(request)
        .filter(|(_, a)| **a > 0.0)
        .map(|(r, a)| r.describe(*a))
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The whole WebAssembly glue of a placement policy: the WIT bindings of the `placement` world
/// (generated in the calling crate, from `../../wit`), the column views handed to `$place`
/// (a `fn(&Workers, &Tasks) -> Vec<Decision>`), the exports (`configure` accepts no settings),
/// and a native test that every WIT column reaches the right resource. A policy crate's
/// `component.rs` is one call: `cloudai_policy_kit::placement_component!(crate::logic::place);`
/// (the crate depends on `wit-bindgen`).
#[macro_export]
macro_rules! placement_component {
    ($place:path) => {
        #[allow(unsafe_code)]
        mod bindings {
            ::wit_bindgen::generate!({ path: "../../wit", world: "placement" });
        }

        use bindings::cloudai::policy::types::{PlacementDecision, PlacementInput};
        use $crate::{Decision, Tasks, Workers};

        struct Component;

        impl bindings::exports::cloudai::policy::config::Guest for Component {
            fn configure(_config: String) -> Result<(), String> {
                Ok(())
            }
        }

        impl bindings::Guest for Component {
            fn place(input: PlacementInput) -> Vec<PlacementDecision> {
                let (w, t) = (&input.workers, &input.tasks);
                let workers = Workers {
                    total: [
                        &w.total_cpu,
                        &w.total_memory,
                        &w.total_storage,
                        &w.total_gpu,
                    ],
                    available: [
                        &w.available_cpu,
                        &w.available_memory,
                        &w.available_storage,
                        &w.available_gpu,
                    ],
                };
                let tasks = Tasks {
                    request: [&t.req_cpu, &t.req_memory, &t.req_storage, &t.req_gpu],
                };
                $place(&workers, &tasks)
                    .into_iter()
                    .map(to_wit)
                    .collect()
            }
        }

        fn to_wit(d: Decision) -> PlacementDecision {
            match d {
                Decision::Assign(w) => PlacementDecision::Assign(w),
                Decision::Wait(r) => PlacementDecision::Wait(r),
                Decision::Unschedulable(r) => PlacementDecision::Unschedulable(r),
            }
        }

        // Export symbol names such as `cloudai:policy/config@0.1.0#configure` are only valid in a Wasm
        // module; a native cdylib's linker script rejects them.
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        mod export {
            use super::{Component, bindings};
            bindings::export!(Component with_types_in bindings);
        }

        #[cfg(test)]
        mod tests {
            use super::Component;
            use super::bindings::Guest;
            use super::bindings::cloudai::policy::types::{
                LabelIndex, PlacementDecision, PlacementInput, TaskColumns, WorkerColumns,
            };

            fn labels(n: usize) -> LabelIndex {
                LabelIndex {
                    offsets: vec![0; n + 1],
                    pairs: Vec::new(),
                }
            }

            /// Rows `[cpu, memory, storage, gpu]` into the WIT columns.
            fn input(total: &[[f64; 4]], free: &[[f64; 4]], req: &[[f64; 4]]) -> PlacementInput {
                let col = |rows: &[[f64; 4]], r: usize| rows.iter().map(|x| x[r]).collect::<Vec<_>>();
                let used: Vec<[f64; 4]> = total
                    .iter()
                    .zip(free)
                    .map(|(t, f)| [t[0] - f[0], t[1] - f[1], t[2] - f[2], t[3] - f[3]])
                    .collect();
                let (nw, nt) = (total.len(), req.len());
                PlacementInput {
                    strings: vec!["w".into()],
                    workers: WorkerColumns {
                        total_cpu: col(total, 0),
                        total_memory: col(total, 1),
                        total_storage: col(total, 2),
                        total_gpu: col(total, 3),
                        allocated_cpu: col(&used, 0),
                        allocated_memory: col(&used, 1),
                        allocated_storage: col(&used, 2),
                        allocated_gpu: col(&used, 3),
                        available_cpu: col(free, 0),
                        available_memory: col(free, 1),
                        available_storage: col(free, 2),
                        available_gpu: col(free, 3),
                        heartbeat_age_s: vec![0.0; nw],
                        running_tasks: vec![0; nw],
                        labels: labels(nw),
                        attributes: Vec::new(),
                    },
                    tasks: TaskColumns {
                        req_cpu: col(req, 0),
                        req_memory: col(req, 1),
                        req_storage: col(req, 2),
                        req_gpu: col(req, 3),
                        priority: vec![0; nt],
                        attempts: vec![0; nt],
                        age_s: vec![0.0; nt],
                        id: vec![0; nt],
                        user: vec![0; nt],
                        image: vec![0; nt],
                        labels: labels(nt),
                    },
                }
            }

            #[test]
            fn the_glue_maps_every_column_to_its_resource() {
                let total = [[4.0, 8.0, 0.0, 0.0], [4.0, 8.0, 10.0, 1.0]];
                let free = [[4.0, 8.0, 0.0, 0.0], [4.0, 8.0, 4.0, 1.0]];
                let req = [
                    [1.0, 1.0, 3.0, 1.0],
                    [1.0, 1.0, 5.0, 0.0],
                    [5.0, 1.0, 0.0, 0.0],
                    [1.0, 9.0, 0.0, 0.0],
                    [1.0, 1.0, 0.0, 2.0],
                ];
                let d = Component::place(input(&total, &free, &req));
                let text = |d: &PlacementDecision| match d {
                    PlacementDecision::Assign(w) => format!("assign {w}"),
                    PlacementDecision::Wait(r) => format!("wait: {r}"),
                    PlacementDecision::Unschedulable(r) => format!("unschedulable: {r}"),
                };
                let got: Vec<String> = d.iter().map(text).collect();
                assert_eq!(
                    got,
                    [
                        "assign 1",
                        "wait: no worker has 5 GB storage free (largest free: 1 GB)",
                        "unschedulable: no worker has 5 CPU in total (largest: 4 CPU)",
                        "unschedulable: no worker has 9 GB memory in total (largest: 8 GB)",
                        "unschedulable: no worker has 2 GPU in total (largest: 1 GPU)",
                    ]
                );
            }
        }
    };
}

/// Builds column slices from rows in tests, here and in the policy crates.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use super::{Decision, PreemptingDecision, Ranking, Running, Tasks, Workers};

    /// A worker as a test writes it: totals and free capacity, `[cpu, memory, storage, gpu]`.
    pub struct W {
        /// Totals.
        pub total: [f64; 4],
        /// Free capacity.
        pub free: [f64; 4],
    }

    /// An idle worker with these totals.
    pub fn idle(total: [f64; 4]) -> W {
        W { total, free: total }
    }

    /// A worker with these totals and this much free.
    pub fn busy(total: [f64; 4], free: [f64; 4]) -> W {
        W { total, free }
    }

    /// A running task as a test writes it (one entry of [`Running`]).
    pub struct RunningTask {
        /// The worker's index.
        pub worker: u32,
        /// What it holds, `[cpu, memory, storage, gpu]`.
        pub request: [f64; 4],
        /// Its priority.
        pub priority: i32,
        /// Seconds since it was placed.
        pub age_s: f64,
    }

    /// A task running on `worker`, holding `request`.
    pub fn running(worker: u32, request: [f64; 4], priority: i32, age_s: f64) -> RunningTask {
        RunningTask {
            worker,
            request,
            priority,
            age_s,
        }
    }

    /// Four columns (one per resource) from rows.
    fn columns<T>(rows: &[T], f: impl Fn(&T) -> [f64; 4]) -> [Vec<f64>; 4] {
        [0, 1, 2, 3].map(|r| rows.iter().map(|x| f(x)[r]).collect())
    }

    fn views(c: &[Vec<f64>; 4]) -> [&[f64]; 4] {
        [&c[0], &c[1], &c[2], &c[3]]
    }

    /// Runs `ranking` through [`super::place`] on row-shaped workers and task requests.
    pub fn run(ranking: &impl Ranking, workers: &[W], tasks: &[[f64; 4]]) -> Vec<Decision> {
        let (total, free) = (columns(workers, |w| w.total), columns(workers, |w| w.free));
        let req = columns(tasks, |t| *t);
        let workers = Workers {
            total: views(&total),
            available: views(&free),
        };
        let tasks = Tasks {
            request: views(&req),
        };
        super::place(&workers, &tasks, ranking)
    }

    /// Runs `ranking` through [`super::place_preempting`] on row-shaped workers, tasks
    /// (request, priority) and running tasks.
    pub fn run_preempting(
        ranking: &impl Ranking,
        workers: &[W],
        tasks: &[([f64; 4], i32)],
        running: &[RunningTask],
    ) -> Vec<PreemptingDecision> {
        let (total, free) = (columns(workers, |w| w.total), columns(workers, |w| w.free));
        let req = columns(tasks, |t| t.0);
        let priority: Vec<i32> = tasks.iter().map(|t| t.1).collect();
        let holds = columns(running, |r| r.request);
        let worker: Vec<u32> = running.iter().map(|r| r.worker).collect();
        let running_priority: Vec<i32> = running.iter().map(|r| r.priority).collect();
        let age: Vec<f64> = running.iter().map(|r| r.age_s).collect();
        let workers = Workers {
            total: views(&total),
            available: views(&free),
        };
        let tasks = Tasks {
            request: views(&req),
        };
        let running = Running {
            worker: &worker,
            request: views(&holds),
            priority: &running_priority,
            age_s: &age,
        };
        super::place_preempting(&workers, &tasks, &priority, &running, ranking)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{busy, idle, run};
    use super::*;

    /// Takes the first fitting worker: isolates the kit's own behaviour from any ranking.
    struct Any;
    impl Ranking for Any {
        fn rank(&self, _: &[f64; 4], _: &Candidate) -> Option<Rank> {
            Some(Rank::score(0.0))
        }
    }

    #[test]
    fn amounts_format_without_trailing_zeros() {
        assert_eq!(fmt_amount(4.0), "4");
        assert_eq!(fmt_amount(2.5), "2.5");
        assert_eq!(fmt_amount(0.125), "0.13");
        assert_eq!(fmt_amount(1.0 / 1024.0), "0");
        assert_eq!(fmt_amount(1536.75), "1536.75");
    }

    #[test]
    fn batch_accounts_for_its_own_assignments() {
        let d = run(
            &Any,
            &[idle([4.0, 8.0, 10.0, 0.0])],
            &[[3.0, 1.0, 0.0, 0.0]; 2],
        );
        assert_eq!(d[0], Decision::Assign(0));
        assert_eq!(
            d[1],
            Decision::Wait("no worker has 3 CPU free (largest free: 1 CPU)".to_owned())
        );
    }

    #[test]
    fn never_assigns_beyond_free_capacity_in_any_resource() {
        let w = busy([8.0, 16.0, 100.0, 2.0], [8.0, 16.0, 100.0, 0.5]);
        let d = run(&Any, &[w], &[[1.0, 1.0, 1.0, 1.0]]);
        assert_eq!(
            d,
            vec![Decision::Wait(
                "no worker has 1 GPU free (largest free: 0.5 GPU)".to_owned()
            )]
        );
    }

    #[test]
    fn unschedulable_only_when_no_total_could_hold_it() {
        let workers = [
            idle([4.0, 8.0, 10.0, 0.0]),
            busy([8.0, 4.0, 10.0, 0.0], [0.0; 4]),
        ];
        let d = run(
            &Any,
            &workers,
            &[
                [2.0, 16.0, 0.0, 0.0],
                [6.0, 6.0, 0.0, 0.0],
                [6.0, 4.0, 0.0, 0.0],
            ],
        );
        assert_eq!(
            d[0],
            Decision::Unschedulable(
                "no worker has 16 GB memory in total (largest: 8 GB)".to_owned()
            )
        );
        // 6 CPU exists (worker 1) and 6 GB exists (worker 0), never on one worker.
        assert_eq!(
            d[1],
            Decision::Unschedulable(
                "no single worker has 6 CPU, 6 GB memory in total at once".to_owned()
            )
        );
        // Worker 1 could hold it once it frees up.
        assert_eq!(
            d[2],
            Decision::Wait("no worker has 6 CPU free (largest free: 4 CPU)".to_owned())
        );
    }

    #[test]
    fn an_empty_cluster_makes_tasks_wait() {
        assert_eq!(
            run(&Any, &[], &[[1.0, 0.0, 0.0, 0.0]]),
            vec![Decision::Wait("no active worker".to_owned())]
        );
    }

    #[test]
    fn zero_requests_fit_anywhere_and_no_tasks_give_no_decisions() {
        assert_eq!(
            run(&Any, &[idle([0.0; 4])], &[[0.0; 4]]),
            vec![Decision::Assign(0)]
        );
        assert!(run(&Any, &[idle([1.0; 4])], &[]).is_empty());
    }

    #[test]
    fn ragged_columns_are_read_up_to_the_shortest() {
        let one = [1.0];
        let two = [1.0, 1.0];
        let workers = Workers {
            total: [&two, &two, &two, &two],
            available: [&one, &two, &two, &two],
        };
        let req = [1.0, 1.0];
        let tasks = Tasks {
            request: [&req, &req, &req, &req[..1]],
        };
        assert_eq!(workers.len(), 1);
        assert_eq!(place(&workers, &tasks, &Any), vec![Decision::Assign(0)]);
    }

    #[test]
    fn excluded_workers_give_a_wait_naming_eligibility() {
        struct None_;
        impl Ranking for None_ {
            fn rank(&self, _: &[f64; 4], _: &Candidate) -> Option<Rank> {
                None
            }
        }
        assert_eq!(
            run(
                &None_,
                &[idle([2.0, 2.0, 0.0, 0.0])],
                &[[1.0, 2.0, 0.0, 0.0]]
            ),
            vec![Decision::Wait(
                "no eligible worker has 1 CPU, 2 GB memory free".to_owned()
            )]
        );
    }

    #[test]
    fn scores_ignore_resources_the_worker_lacks() {
        let c = Candidate {
            index: 0,
            total: [4.0, 8.0, 0.0, 0.0],
            inv_total: [0.25, 0.125, 0.0, 0.0],
            remaining: [1.0, 6.0, 0.0, 0.0],
        };
        assert_eq!(remaining_fraction_sum(&c), 0.25 + 0.75);
        assert_eq!(max_load_after(&c), 0.75);
    }
}
