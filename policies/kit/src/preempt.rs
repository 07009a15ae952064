//! Preemption (contract 0.2.0): placement that may stop running tasks of lower priority to
//! make room for a task that fits nowhere now.
//!
//! [`place_preempting`] places a batch as [`place`](crate::place) does and, for a task that
//! fits on no worker's free capacity but on some worker's total, looks for the fewest running
//! tasks of lower priority whose stopping would make room. Plain slices in, one
//! [`PreemptingDecision`] per task out; the `preempting_placement_component!` macro is the
//! WebAssembly glue against `wit/0.2.0`.

use crate::{Candidate, Decision, Ranking, Tasks, Workers, fits, place_each, row};

/// The running tasks a placement may preempt, as columns: entry `i` of each slice describes
/// running task `i` (the WIT `running-columns`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Running<'a> {
    /// The worker it runs on, as an index into the workers.
    pub worker: &'a [u32],
    /// What it holds, per resource in [`RESOURCES`](crate::RESOURCES) order.
    pub request: [&'a [f64]; 4],
    /// Its priority (higher runs first).
    pub priority: &'a [i32],
    /// Seconds since it was placed: the work a preemption throws away.
    pub age_s: &'a [f64],
}

impl Running<'_> {
    /// How many running tasks, i.e. the shortest column.
    pub fn len(&self) -> usize {
        self.request
            .iter()
            .map(|c| c.len())
            .chain([self.worker.len(), self.priority.len(), self.age_s.len()])
            .min()
            .unwrap_or(0)
    }

    /// Whether there are no running tasks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decision for one task under contract 0.2.0, mirroring its WIT `placement-decision`.
#[derive(Clone, Debug, PartialEq)]
pub enum PreemptingDecision {
    /// Assign, wait or unschedulable, as in contract 0.1.0.
    Place(Decision),
    /// Stop the `victims` (indices into [`Running`]), all on `worker`, to make room for the
    /// task; the task stays queued until a later round places it.
    Preempt {
        /// The worker, as an index into the workers.
        worker: u32,
        /// The running tasks to stop, as indices into [`Running`], in the order chosen.
        victims: Vec<u32>,
    },
}

impl From<Decision> for PreemptingDecision {
    fn from(d: Decision) -> Self {
        PreemptingDecision::Place(d)
    }
}

/// Places every task in order, preempting where nothing else can make room now.
///
/// - A task that fits some worker's free capacity is assigned exactly as
///   [`place`](crate::place) would with `ranking` (the batch's earlier assignments subtracted).
/// - A task no worker's total could hold is `unschedulable`, as with [`place`](crate::place).
/// - A task that fits no worker's free capacity now is considered for preemption. On each
///   worker the candidate victims are the running tasks there of priority strictly lower than
///   `task_priority[t]` and not already named by an earlier preemption of this batch, taken
///   lowest priority first, then youngest first (least `age_s`), then lowest index; a
///   candidate that frees none of a resource the task is still short of is passed over. They
///   accumulate until the worker's free capacity (less the batch's earlier assignments on it)
///   plus their requests holds the task in all four resources; a worker the ranking excludes
///   at that point (`rank` gives `None`) is not a candidate. The worker needing the fewest
///   victims wins, ties broken by the lowest highest victim priority, then the least total
///   victim age, then the lowest index: the answer is [`PreemptingDecision::Preempt`]. The
///   victims cannot be named again in the batch, and their capacity is not freed for later
///   tasks of the batch (they hold it until they stop); the preempting task is not counted as
///   assigned either.
/// - Otherwise the task waits, with the reason [`place`](crate::place) gives.
///
/// Malformed input does not panic: every view is read up to its shortest column (the tasks
/// up to the shorter of their requests and `task_priority`), and a running task whose worker
/// index is out of range is ignored.
pub fn place_preempting<R: Ranking>(
    workers: &Workers<'_>,
    tasks: &Tasks<'_>,
    task_priority: &[i32],
    running: &Running<'_>,
    ranking: &R,
) -> Vec<PreemptingDecision> {
    let n = tasks.len().min(task_priority.len());
    let tasks = Tasks {
        request: tasks.request.map(|c| &c[..n]),
    };
    // Preemption frees nothing within the batch, so the assignments are exactly those of a
    // plain placement; replaying them in order gives each task the free capacity it saw.
    let placed = place_each(workers, &tasks, |_| ranking);

    let nw = workers.len();
    let nr = running.len();
    let mut free: Vec<[f64; 4]> = (0..nw).map(|w| row(&workers.available, w)).collect();
    let mut pool = VictimPool::new(running, nw, nr);

    placed
        .into_iter()
        .enumerate()
        .map(|(t, decision)| {
            let request = row(&tasks.request, t);
            match decision {
                Decision::Assign(w) => {
                    if let Some(f) = free.get_mut(w as usize) {
                        for (f, r) in f.iter_mut().zip(request) {
                            *f -= r;
                        }
                    }
                    PreemptingDecision::Place(Decision::Assign(w))
                }
                Decision::Wait(reason) if nr > 0 && !free.iter().any(|f| fits(&request, f)) => {
                    match pool.choose(workers, &free, &request, task_priority[t], ranking) {
                        Some((worker, victims)) => PreemptingDecision::Preempt {
                            worker: worker as u32,
                            victims: victims.into_iter().map(|i| i as u32).collect(),
                        },
                        None => PreemptingDecision::Place(Decision::Wait(reason)),
                    }
                }
                other => PreemptingDecision::Place(other),
            }
        })
        .collect()
}

/// The running tasks per worker, in victim order, and which the batch has already named.
struct VictimPool<'r> {
    running: &'r Running<'r>,
    /// Per worker, its running tasks' indices: lowest priority, then youngest, then index.
    on_worker: Vec<Vec<usize>>,
    used: Vec<bool>,
}

/// A worker's victims and what ranks them: (count, highest priority, total age, worker).
struct Choice {
    worker: usize,
    victims: Vec<usize>,
    max_priority: i32,
    total_age: f64,
}

impl Choice {
    fn better_than(&self, other: &Choice) -> bool {
        self.victims
            .len()
            .cmp(&other.victims.len())
            .then(self.max_priority.cmp(&other.max_priority))
            .then(self.total_age.total_cmp(&other.total_age))
            .then(self.worker.cmp(&other.worker))
            .is_lt()
    }
}

impl<'r> VictimPool<'r> {
    fn new(running: &'r Running<'r>, workers: usize, len: usize) -> Self {
        let mut on_worker: Vec<Vec<usize>> = vec![Vec::new(); workers];
        for i in 0..len {
            if let Some(list) = on_worker.get_mut(running.worker[i] as usize) {
                list.push(i);
            }
        }
        for list in &mut on_worker {
            list.sort_by(|&a, &b| {
                running.priority[a]
                    .cmp(&running.priority[b])
                    .then(running.age_s[a].total_cmp(&running.age_s[b]))
                    .then(a.cmp(&b))
            });
        }
        VictimPool {
            running,
            on_worker,
            used: vec![false; len],
        }
    }

    /// The best worker and its victims for a task of `priority` requesting `request`, given
    /// each worker's `free` capacity now; marks the victims used.
    fn choose<R: Ranking>(
        &mut self,
        workers: &Workers<'_>,
        free: &[[f64; 4]],
        request: &[f64; 4],
        priority: i32,
        ranking: &R,
    ) -> Option<(usize, Vec<usize>)> {
        let mut best: Option<Choice> = None;
        for (w, list) in self.on_worker.iter().enumerate() {
            let mut have = free[w];
            let mut victims = Vec::new();
            for &i in list {
                if fits(request, &have) {
                    break;
                }
                if self.running.priority[i] >= priority {
                    break; // sorted by priority: none further qualifies
                }
                if self.used[i] {
                    continue;
                }
                let holds = row(&self.running.request, i);
                let helps = (0..4).any(|r| have[r] < request[r] && holds[r] > 0.0);
                if !helps {
                    continue;
                }
                for (h, x) in have.iter_mut().zip(holds) {
                    *h += x;
                }
                victims.push(i);
            }
            if victims.is_empty() || !fits(request, &have) {
                continue;
            }
            let total = row(&workers.total, w);
            let candidate = Candidate {
                index: w,
                total,
                inv_total: total.map(|t| if t > 0.0 { 1.0 / t } else { 0.0 }),
                remaining: [
                    have[0] - request[0],
                    have[1] - request[1],
                    have[2] - request[2],
                    have[3] - request[3],
                ],
            };
            if ranking.rank(request, &candidate).is_none() {
                continue;
            }
            let choice = Choice {
                worker: w,
                max_priority: victims
                    .iter()
                    .map(|&i| self.running.priority[i])
                    .max()
                    .unwrap_or(i32::MIN),
                total_age: victims.iter().map(|&i| self.running.age_s[i]).sum(),
                victims,
            };
            if best.as_ref().is_none_or(|b| choice.better_than(b)) {
                best = Some(choice);
            }
        }
        let best = best?;
        for &i in &best.victims {
            self.used[i] = true;
        }
        Some((best.worker, best.victims))
    }
}

/// The whole WebAssembly glue of a preempting placement policy, against contract 0.2.0: the WIT
/// bindings of its `placement` world (generated in the calling crate, from `../../wit/0.2.0`),
/// the column views handed to `$place` (a
/// `fn(&Workers, &Tasks, &[i32], &Running) -> Vec<PreemptingDecision>`, the `&[i32]` being the
/// tasks' priorities), the exports (`configure` accepts no settings), and a native test that
/// every WIT column reaches its view and a preemption its WIT answer. A policy crate's
/// `component.rs` is one call:
/// `cloudai_policy_kit::preempting_placement_component!(crate::logic::place);`
/// (the crate depends on `wit-bindgen`).
#[macro_export]
macro_rules! preempting_placement_component {
    ($place:path) => {
        #[allow(unsafe_code)]
        mod bindings {
            ::wit_bindgen::generate!({ path: "../../wit/0.2.0", world: "placement" });
        }

        use bindings::cloudai::policy::types::{PlacementDecision, PlacementInput, Preemption};
        use $crate::{Decision, PreemptingDecision, Running, Tasks, Workers};

        struct Component;

        impl bindings::exports::cloudai::policy::config::Guest for Component {
            fn configure(_config: String) -> Result<(), String> {
                Ok(())
            }
        }

        impl bindings::Guest for Component {
            fn place(input: PlacementInput) -> Vec<PlacementDecision> {
                let (w, t, r) = (&input.workers, &input.tasks, &input.running);
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
                let running = Running {
                    worker: &r.worker,
                    request: [&r.req_cpu, &r.req_memory, &r.req_storage, &r.req_gpu],
                    priority: &r.priority,
                    age_s: &r.age_s,
                };
                $place(&workers, &tasks, &t.priority, &running)
                    .into_iter()
                    .map(to_wit)
                    .collect()
            }
        }

        fn to_wit(d: PreemptingDecision) -> PlacementDecision {
            match d {
                PreemptingDecision::Place(Decision::Assign(w)) => PlacementDecision::Assign(w),
                PreemptingDecision::Place(Decision::Wait(r)) => PlacementDecision::Wait(r),
                PreemptingDecision::Place(Decision::Unschedulable(r)) => {
                    PlacementDecision::Unschedulable(r)
                }
                PreemptingDecision::Preempt { worker, victims } => {
                    PlacementDecision::Preempt(Preemption { worker, victims })
                }
            }
        }

        // Export symbol names such as `cloudai:policy/config@0.2.0#configure` are only valid in
        // a Wasm module; a native cdylib's linker script rejects them.
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
                LabelIndex, PlacementDecision, PlacementInput, RunningColumns, TaskColumns,
                WorkerColumns,
            };

            fn labels(n: usize) -> LabelIndex {
                LabelIndex {
                    offsets: vec![0; n + 1],
                    pairs: Vec::new(),
                }
            }

            fn col(rows: &[[f64; 4]], r: usize) -> Vec<f64> {
                rows.iter().map(|x| x[r]).collect()
            }

            /// Rows `[cpu, memory, storage, gpu]` into the WIT columns; tasks are (request,
            /// priority), running tasks (worker, request, priority, age).
            fn input(
                total: &[[f64; 4]],
                free: &[[f64; 4]],
                tasks: &[([f64; 4], i32)],
                running: &[(u32, [f64; 4], i32, f64)],
            ) -> PlacementInput {
                let used: Vec<[f64; 4]> = total
                    .iter()
                    .zip(free)
                    .map(|(t, f)| [t[0] - f[0], t[1] - f[1], t[2] - f[2], t[3] - f[3]])
                    .collect();
                let req: Vec<[f64; 4]> = tasks.iter().map(|t| t.0).collect();
                let holds: Vec<[f64; 4]> = running.iter().map(|r| r.1).collect();
                let (nw, nt, nr) = (total.len(), tasks.len(), running.len());
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
                        req_cpu: col(&req, 0),
                        req_memory: col(&req, 1),
                        req_storage: col(&req, 2),
                        req_gpu: col(&req, 3),
                        priority: tasks.iter().map(|t| t.1).collect(),
                        attempts: vec![0; nt],
                        age_s: vec![0.0; nt],
                        id: vec![0; nt],
                        user: vec![0; nt],
                        image: vec![0; nt],
                        labels: labels(nt),
                    },
                    running: RunningColumns {
                        worker: running.iter().map(|r| r.0).collect(),
                        req_cpu: col(&holds, 0),
                        req_memory: col(&holds, 1),
                        req_storage: col(&holds, 2),
                        req_gpu: col(&holds, 3),
                        priority: running.iter().map(|r| r.2).collect(),
                        age_s: running.iter().map(|r| r.3).collect(),
                        id: vec![0; nr],
                        user: vec![0; nr],
                    },
                }
            }

            #[test]
            fn the_glue_maps_every_column_to_its_resource_and_preemptions_back() {
                // Worker 0 is small and idle; worker 1 is full, with five tasks running on it
                // that each hold one resource.
                let total = [[2.0, 2.0, 2.0, 0.0], [8.0, 8.0, 10.0, 1.0]];
                let free = [[2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]];
                let running = [
                    (1, [4.0, 0.0, 0.0, 0.0], 1, 50.0),
                    (1, [4.0, 0.0, 0.0, 0.0], 1, 5.0),
                    (1, [0.0, 8.0, 0.0, 0.0], 1, 1.0),
                    (1, [0.0, 0.0, 10.0, 0.0], 1, 1.0),
                    (1, [0.0, 0.0, 0.0, 1.0], 1, 1.0),
                ];
                let tasks = [
                    ([1.0, 1.0, 1.0, 0.0], 0),
                    ([3.0, 0.0, 0.0, 0.0], 5),
                    ([0.0, 5.0, 0.0, 0.0], 5),
                    ([0.0, 0.0, 5.0, 0.0], 5),
                    ([0.0, 0.0, 0.0, 1.0], 5),
                    ([2.0, 0.0, 0.0, 0.0], 1),
                    ([9.0, 0.0, 0.0, 0.0], 9),
                ];
                let d = Component::place(input(&total, &free, &tasks, &running));
                let text = |d: &PlacementDecision| match d {
                    PlacementDecision::Assign(w) => format!("assign {w}"),
                    PlacementDecision::Wait(r) => format!("wait: {r}"),
                    PlacementDecision::Unschedulable(r) => format!("unschedulable: {r}"),
                    PlacementDecision::Preempt(p) => {
                        format!("preempt on {}: {:?}", p.worker, p.victims)
                    }
                };
                let got: Vec<String> = d.iter().map(text).collect();
                assert_eq!(
                    got,
                    [
                        "assign 0",
                        // The younger of the two CPU holders.
                        "preempt on 1: [1]",
                        "preempt on 1: [2]",
                        "preempt on 1: [3]",
                        "preempt on 1: [4]",
                        // Priority 1 preempts no task of priority 1.
                        "wait: no worker has 2 CPU free (largest free: 1 CPU)",
                        "unschedulable: no worker has 9 CPU in total (largest: 8 CPU)",
                    ]
                );
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{W, busy, idle, run, run_preempting, running};
    use crate::{Rank, remaining_fraction_sum};

    /// Best-fit, as the shipped best-fit-preempt ranks.
    struct Tight;
    impl Ranking for Tight {
        fn rank(&self, _: &[f64; 4], c: &Candidate) -> Option<Rank> {
            Some(Rank::score(remaining_fraction_sum(c)))
        }
    }

    fn preempt(worker: u32, victims: &[u32]) -> PreemptingDecision {
        PreemptingDecision::Preempt {
            worker,
            victims: victims.to_vec(),
        }
    }

    fn assign(w: u32) -> PreemptingDecision {
        PreemptingDecision::Place(Decision::Assign(w))
    }

    fn wait(reason: &str) -> PreemptingDecision {
        PreemptingDecision::Place(Decision::Wait(reason.to_owned()))
    }

    /// A worker of 8 CPU / 16 GB, fully taken.
    fn full() -> W {
        busy([8.0, 16.0, 0.0, 0.0], [0.0; 4])
    }

    #[test]
    fn uses_free_capacity_before_preempting() {
        let workers = [full(), idle([4.0, 8.0, 0.0, 0.0])];
        let low = [running(0, [8.0, 16.0, 0.0, 0.0], 0, 5.0)];
        let d = run_preempting(&Tight, &workers, &[([2.0, 2.0, 0.0, 0.0], 10)], &low);
        assert_eq!(d, vec![assign(1)]);
    }

    #[test]
    fn matches_plain_placement_when_nothing_is_preempted() {
        let workers = [
            busy([8.0, 16.0, 0.0, 0.0], [4.0, 8.0, 0.0, 0.0]),
            idle([8.0, 16.0, 0.0, 0.0]),
        ];
        let tasks = [[2.0, 4.0, 0.0, 0.0]; 5];
        let plain: Vec<PreemptingDecision> = run(&Tight, &workers, &tasks)
            .into_iter()
            .map(PreemptingDecision::from)
            .collect();
        let with_priority: Vec<([f64; 4], i32)> = tasks.iter().map(|t| (*t, 0)).collect();
        let d = run_preempting(&Tight, &workers, &with_priority, &[]);
        assert_eq!(d, plain);
    }

    #[test]
    fn never_preempts_equal_or_higher_priority() {
        let r = [
            running(0, [4.0, 8.0, 0.0, 0.0], 5, 1.0),
            running(0, [4.0, 8.0, 0.0, 0.0], 7, 1.0),
        ];
        let d = run_preempting(&Tight, &[full()], &[([1.0, 1.0, 0.0, 0.0], 5)], &r);
        assert_eq!(
            d,
            vec![wait(
                "no worker has 1 CPU free (largest free: 0 CPU), 1 GB memory free (largest free: 0 GB)"
            )]
        );
        // One priority more and the priority-5 task gives way, never the priority-7 one.
        let d = run_preempting(&Tight, &[full()], &[([1.0, 1.0, 0.0, 0.0], 6)], &r);
        assert_eq!(d, vec![preempt(0, &[0])]);
    }

    #[test]
    fn takes_the_lowest_priority_then_the_youngest_victims() {
        let r = [
            running(0, [2.0, 4.0, 0.0, 0.0], 3, 10.0),
            running(0, [2.0, 4.0, 0.0, 0.0], 1, 500.0),
            running(0, [2.0, 4.0, 0.0, 0.0], 1, 50.0),
            running(0, [2.0, 4.0, 0.0, 0.0], 2, 1.0),
        ];
        let task = |cpu: f64| ([cpu, 1.0, 0.0, 0.0], 9);
        // One victim: the youngest of the lowest priority.
        assert_eq!(
            run_preempting(&Tight, &[full()], &[task(2.0)], &r),
            vec![preempt(0, &[2])]
        );
        // Three: both priority-1 tasks, youngest first, then priority 2 before 3.
        assert_eq!(
            run_preempting(&Tight, &[full()], &[task(6.0)], &r),
            vec![preempt(0, &[2, 1, 3])]
        );
    }

    #[test]
    fn passes_over_victims_that_free_nothing_the_task_lacks() {
        let gpu = busy([8.0, 16.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]);
        let r = [
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 1.0),
            running(0, [4.0, 8.0, 0.0, 2.0], 1, 1.0),
        ];
        // Victim 0 is first in line but holds no GPU: stopping it would gain nothing.
        let d = run_preempting(&Tight, &[gpu], &[([0.0, 0.0, 0.0, 1.0], 5)], &r);
        assert_eq!(d, vec![preempt(0, &[1])]);
    }

    #[test]
    fn the_worker_needing_fewest_victims_wins_then_lowest_priority_then_least_age() {
        let workers = [full(), full(), full(), full()];
        let r = [
            // Worker 0: two small victims of priority 0.
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 1.0),
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 1.0),
            // Worker 1: one big victim of priority 2.
            running(1, [8.0, 16.0, 0.0, 0.0], 2, 1.0),
            // Worker 2: one big victim of priority 1, older.
            running(2, [8.0, 16.0, 0.0, 0.0], 1, 90.0),
            // Worker 3: one big victim of priority 1, younger.
            running(3, [8.0, 16.0, 0.0, 0.0], 1, 30.0),
        ];
        let task = ([6.0, 12.0, 0.0, 0.0], 5);
        assert_eq!(
            run_preempting(&Tight, &workers, &[task], &r),
            vec![preempt(3, &[4])]
        );
        // Equal in all three: the lowest index.
        let r = [
            running(1, [8.0, 16.0, 0.0, 0.0], 1, 30.0),
            running(2, [8.0, 16.0, 0.0, 0.0], 1, 30.0),
        ];
        assert_eq!(
            run_preempting(&Tight, &workers, &[task], &r),
            vec![preempt(1, &[0])]
        );
    }

    #[test]
    fn counts_the_free_capacity_left_on_the_worker() {
        // Worker 0's 3 free CPU make one 1-CPU victim enough for a 4-CPU task; worker 1 has
        // none free and needs two victims, of lower priority: the fewer victims win.
        let workers = [
            busy([8.0, 16.0, 0.0, 0.0], [3.0, 16.0, 0.0, 0.0]),
            busy([8.0, 16.0, 0.0, 0.0], [0.0, 16.0, 0.0, 0.0]),
        ];
        let r = [
            running(0, [1.0, 0.0, 0.0, 0.0], 2, 1.0),
            running(0, [4.0, 0.0, 0.0, 0.0], 2, 1.0),
            running(1, [2.0, 0.0, 0.0, 0.0], 1, 1.0),
            running(1, [2.0, 0.0, 0.0, 0.0], 1, 2.0),
            running(1, [4.0, 0.0, 0.0, 0.0], 1, 3.0),
        ];
        let d = run_preempting(&Tight, &workers, &[([4.0, 0.0, 0.0, 0.0], 5)], &r);
        assert_eq!(d, vec![preempt(0, &[0])]);
    }

    #[test]
    fn a_victim_is_named_once_per_batch_and_its_capacity_not_reused() {
        let r = [
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 1.0),
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 2.0),
        ];
        let task = ([4.0, 8.0, 0.0, 0.0], 5);
        let d = run_preempting(&Tight, &[full()], &[task, task, task], &r);
        assert_eq!(
            d,
            vec![
                preempt(0, &[0]),
                preempt(0, &[1]),
                wait(
                    "no worker has 4 CPU free (largest free: 0 CPU), 8 GB memory free (largest free: 0 GB)"
                ),
            ]
        );
        // A small task after a preemption does not get the victim's room: it waits.
        let small = ([1.0, 1.0, 0.0, 0.0], 0);
        let d = run_preempting(&Tight, &[full()], &[task, small], &r[..1]);
        assert_eq!(
            d,
            vec![
                preempt(0, &[0]),
                wait(
                    "no worker has 1 CPU free (largest free: 0 CPU), 1 GB memory free (largest free: 0 GB)"
                ),
            ]
        );
    }

    #[test]
    fn a_preempting_task_is_not_counted_as_assigned() {
        let workers = [
            busy([8.0, 16.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0]),
            idle([2.0, 4.0, 0.0, 0.0]),
        ];
        let r = [running(0, [6.0, 12.0, 0.0, 0.0], 0, 1.0)];
        let d = run_preempting(
            &Tight,
            &workers,
            &[
                ([8.0, 16.0, 0.0, 0.0], 5),
                ([2.0, 4.0, 0.0, 0.0], 0),
                ([2.0, 4.0, 0.0, 0.0], 0),
            ],
            &r,
        );
        // The worker's own 2 CPU / 4 GB stay free for the batch's later tasks.
        assert_eq!(d, vec![preempt(0, &[0]), assign(0), assign(1)]);
    }

    #[test]
    fn assignments_earlier_in_the_batch_count_against_a_preemption() {
        let workers = [busy([8.0, 16.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0])];
        let r = [
            running(0, [2.0, 4.0, 0.0, 0.0], 0, 1.0),
            running(0, [2.0, 4.0, 0.0, 0.0], 0, 2.0),
        ];
        let d = run_preempting(
            &Tight,
            &workers,
            &[([2.0, 4.0, 0.0, 0.0], 0), ([4.0, 8.0, 0.0, 0.0], 5)],
            &r,
        );
        // Without the first assignment one victim would do; with it, both are needed.
        assert_eq!(d, vec![assign(0), preempt(0, &[0, 1])]);
    }

    #[test]
    fn unschedulable_when_no_total_could_hold_it_whatever_runs() {
        let r = [running(0, [8.0, 16.0, 0.0, 0.0], 0, 1.0)];
        let d = run_preempting(&Tight, &[full()], &[([16.0, 1.0, 0.0, 0.0], 9)], &r);
        assert_eq!(
            d,
            vec![PreemptingDecision::Place(Decision::Unschedulable(
                "no worker has 16 CPU in total (largest: 8 CPU)".to_owned()
            ))]
        );
    }

    #[test]
    fn waits_when_even_every_victim_would_not_make_room() {
        let r = [running(0, [2.0, 4.0, 0.0, 0.0], 0, 1.0)];
        let d = run_preempting(&Tight, &[full()], &[([4.0, 4.0, 0.0, 0.0], 9)], &r);
        assert_eq!(
            d,
            vec![wait(
                "no worker has 4 CPU free (largest free: 0 CPU), 4 GB memory free (largest free: 0 GB)"
            )]
        );
    }

    #[test]
    fn a_worker_the_ranking_excludes_is_not_preempted_on() {
        struct NotZero;
        impl Ranking for NotZero {
            fn rank(&self, _: &[f64; 4], c: &Candidate) -> Option<Rank> {
                (c.index != 0).then_some(Rank::score(0.0))
            }
        }
        let r = [
            running(0, [8.0, 16.0, 0.0, 0.0], 0, 1.0),
            running(1, [4.0, 8.0, 0.0, 0.0], 0, 1.0),
            running(1, [4.0, 8.0, 0.0, 0.0], 0, 2.0),
        ];
        let d = run_preempting(
            &NotZero,
            &[full(), full()],
            &[([8.0, 16.0, 0.0, 0.0], 9)],
            &r,
        );
        assert_eq!(d, vec![preempt(1, &[1, 2])]);
    }

    #[test]
    fn malformed_input_is_read_up_to_the_shortest_column_without_panicking() {
        let (total, free) = ([8.0], [0.0]);
        let workers = Workers {
            total: [&total, &total, &total, &total],
            available: [&free, &free, &free, &free],
        };
        let req = [1.0, 1.0, 1.0];
        let tasks = Tasks {
            request: [&req, &req, &req, &req],
        };
        let one = [4.0];
        let holds = [4.0, 4.0, 4.0];
        let running = Running {
            // Entry 0 names worker 7, which does not exist; entry 2 has no age.
            worker: &[7, 0, 0],
            request: [&holds, &holds, &holds, &holds],
            priority: &[0, 0, 0],
            age_s: &[1.0, f64::NAN],
        };
        assert_eq!(running.len(), 2);
        let d = place_preempting(&workers, &tasks, &[5, 5], &running, &Tight);
        assert_eq!(
            d,
            vec![
                preempt(0, &[1]),
                wait(
                    "no worker has 1 CPU free (largest free: 0 CPU), 1 GB memory free \
                     (largest free: 0 GB), 1 GB storage free (largest free: 0 GB), 1 GPU free \
                     (largest free: 0 GPU)"
                ),
            ]
        );
        let none = Running::default();
        assert!(none.is_empty());
        let ragged = Running {
            request: [&one, &[], &one, &one],
            ..running
        };
        assert!(ragged.is_empty());
        assert_eq!(
            place_preempting(&workers, &tasks, &[], &running, &Tight),
            Vec::new()
        );
        let empty = Workers {
            total: [&[], &[], &[], &[]],
            available: [&[], &[], &[], &[]],
        };
        assert_eq!(
            place_preempting(&empty, &tasks, &[5], &running, &Tight),
            vec![wait("no active worker")]
        );
    }
}
