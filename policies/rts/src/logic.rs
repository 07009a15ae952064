//! Risk-aware placement (RTS): each task goes to the worker least likely to make it miss its
//! deadline, the load it adds weighed against that risk.
//!
//! The model, per task of type `T` (its `task-type` label, else its image):
//!
//! - `tau`: the expected runtime of `T`, the mean of its observed runs over the workers
//!   (weighted by runs), from the host's `mean-runtime-s:T` and `runs:T` worker attributes;
//! - deadline `k * tau` after submission, `k` from the task's `sla-multiplier` label, else the
//!   configured `sla_multiplier`; the time the task already waited counts against it;
//! - the worker's affinity `s`: how fast `T` ran there relative to `tau` (its mean / `tau`),
//!   shrunk towards 1 by `prior_runs` imaginary average runs, so one lucky run does not decide;
//!   1 on a worker where `T` never ran;
//! - predicted runtime on the worker `tau * s * (1 + load_slowdown * load + fit_slowdown * fit)`,
//!   where `load` is the worker's load after placement (the max over its resources of
//!   allocated / total, tasks placed earlier in the batch included, or its measured
//!   `cpu-utilisation` when higher) and `fit` how tightly the request fills the worker's free
//!   capacity (max over resources of request / free);
//! - risk: the probability that the run overruns the time left to the deadline, the runtime
//!   taken as normal with standard deviation `runtime_cv * predicted`;
//! - score `overrun_weight * risk + load_weight * load`: lowest wins, lowest index on ties.
//!
//! Without any history of `T` the task is placed by best-fit (the shipped `best-fit` policy's
//! ranking), so a new cluster behaves like the default until runs are recorded.

use std::collections::HashMap;

use cloudai_policy_kit::{
    Candidate, Decision, Rank, Ranking, Tasks, Workers, max_load_after, remaining_fraction_sum,
};
use serde::Deserialize;

/// The task label naming its type (the host's runtime statistics are kept per type).
pub const TASK_TYPE_LABEL: &str = "task-type";
/// The task label overriding the configured SLA multiplier `k` for one task.
pub const SLA_LABEL: &str = "sla-multiplier";

/// The policy's parameters (the JSON configuration; every key optional).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `k`: a task's deadline is `k` times its type's expected runtime after submission.
    pub sla_multiplier: f64,
    /// Spread of a runtime around its prediction (standard deviation / mean).
    pub runtime_cv: f64,
    /// Weight of the risk of missing the deadline (0..1) in the score.
    pub overrun_weight: f64,
    /// Weight of the worker's load after placement (0..1) in the score.
    pub load_weight: f64,
    /// How much a fully loaded worker slows a run down (0.5: 50% longer).
    pub load_slowdown: f64,
    /// How much a request that fills the worker's free capacity slows a run down.
    pub fit_slowdown: f64,
    /// Imaginary average runs that a worker's affinity is shrunk towards.
    pub prior_runs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sla_multiplier: 2.0,
            runtime_cv: 0.25,
            overrun_weight: 10.0,
            load_weight: 1.0,
            load_slowdown: 0.5,
            fit_slowdown: 0.25,
            prior_runs: 2.0,
        }
    }
}

impl Config {
    /// Parses and checks a JSON configuration (`{}`: the defaults).
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("rts config: {e}"))?;
        if !value.is_object() {
            return Err("rts config: expected a JSON object".to_string());
        }
        let config: Config =
            serde_json::from_value(value).map_err(|e| format!("rts config: {e}"))?;
        let positive = [
            ("sla_multiplier", config.sla_multiplier),
            ("runtime_cv", config.runtime_cv),
        ];
        for (key, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "rts config: {key} must be a number > 0, got {value}"
                ));
            }
        }
        let non_negative = [
            ("overrun_weight", config.overrun_weight),
            ("load_weight", config.load_weight),
            ("load_slowdown", config.load_slowdown),
            ("fit_slowdown", config.fit_slowdown),
            ("prior_runs", config.prior_runs),
        ];
        for (key, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!(
                    "rts config: {key} must be a number >= 0, got {value}"
                ));
            }
        }
        Ok(config)
    }
}

/// A numeric worker attribute: `values[i]` holds where `known[i]`.
#[derive(Clone, Copy, Debug)]
pub struct Attribute<'a> {
    pub known: &'a [bool],
    pub values: &'a [f64],
}

impl Attribute<'_> {
    /// The value for worker `w`, when known and finite.
    pub fn get(&self, w: usize) -> Option<f64> {
        match (self.known.get(w), self.values.get(w)) {
            (Some(true), Some(v)) if v.is_finite() => Some(*v),
            _ => None,
        }
    }
}

/// The observed runs of one task type: the `mean-runtime-s:<type>` attribute and, when sent,
/// `runs:<type>`.
#[derive(Clone, Copy, Debug)]
pub struct History<'a> {
    pub mean_runtime_s: Attribute<'a>,
    pub runs: Option<Attribute<'a>>,
}

/// One task as the risk model needs it, beside its request in [`Tasks`].
#[derive(Clone, Copy, Debug)]
pub struct TaskInfo<'a> {
    pub task_type: &'a str,
    /// From the task's `sla-multiplier` label, when it holds a number > 0.
    pub sla_multiplier: Option<f64>,
    /// Seconds since submission.
    pub age_s: f64,
}

/// A round: the workers, the tasks, and what the host knows beyond capacity.
pub struct Round<'a> {
    pub workers: Workers<'a>,
    pub tasks: Tasks<'a>,
    pub info: Vec<TaskInfo<'a>>,
    pub cpu_utilisation: Option<Attribute<'a>>,
    pub history: HashMap<&'a str, History<'a>>,
}

/// One decision per task, in order.
pub fn place(round: &Round<'_>, config: &Config) -> Vec<Decision> {
    let n = round.workers.len();
    let mut models: HashMap<&str, Option<TypeModel>> = HashMap::new();
    cloudai_policy_kit::place_each(&round.workers, &round.tasks, |t| {
        let Some(info) = round.info.get(t) else {
            return TaskRanking::BestFit;
        };
        let model = models
            .entry(info.task_type)
            .or_insert_with(|| {
                round
                    .history
                    .get(info.task_type)
                    .and_then(|h| TypeModel::learn(h, n, config.prior_runs))
            })
            .clone();
        match model {
            None => TaskRanking::BestFit,
            Some(model) => {
                let k = info.sla_multiplier.unwrap_or(config.sla_multiplier);
                TaskRanking::Risk {
                    slack_s: k * model.tau - info.age_s.max(0.0),
                    model,
                    config,
                    cpu_utilisation: round.cpu_utilisation,
                }
            }
        }
    })
}

/// What the history says about one task type: its expected runtime and each worker's
/// affinity (runtime there relative to `tau`).
#[derive(Clone, Debug, PartialEq)]
pub struct TypeModel {
    pub tau: f64,
    pub affinity: Vec<f64>,
}

impl TypeModel {
    /// `None` without a single usable run on any worker.
    pub fn learn(history: &History<'_>, workers: usize, prior_runs: f64) -> Option<TypeModel> {
        let observed: Vec<Option<(f64, f64)>> = (0..workers)
            .map(|w| {
                let mean = history.mean_runtime_s.get(w).filter(|m| *m >= 0.0)?;
                let runs = history
                    .runs
                    .map_or(Some(1.0), |r| r.get(w))
                    .filter(|r| *r > 0.0)?;
                Some((mean, runs))
            })
            .collect();
        let (sum, runs) = observed
            .iter()
            .flatten()
            .fold((0.0, 0.0), |(s, n), (mean, runs)| {
                (s + mean * runs, n + runs)
            });
        if runs <= 0.0 || sum <= 0.0 {
            return None;
        }
        let tau = sum / runs;
        let affinity = observed
            .iter()
            .map(|o| match o {
                Some((mean, runs)) => (runs * mean / tau + prior_runs) / (runs + prior_runs),
                None => 1.0,
            })
            .collect();
        Some(TypeModel { tau, affinity })
    }
}

enum TaskRanking<'a> {
    BestFit,
    Risk {
        model: TypeModel,
        /// Seconds left to the deadline (negative: already missed).
        slack_s: f64,
        config: &'a Config,
        cpu_utilisation: Option<Attribute<'a>>,
    },
}

impl Ranking for TaskRanking<'_> {
    fn rank(&self, request: &[f64; 4], c: &Candidate) -> Option<Rank> {
        match self {
            TaskRanking::BestFit => Some(Rank::score(remaining_fraction_sum(c))),
            TaskRanking::Risk {
                model,
                slack_s,
                config,
                cpu_utilisation,
            } => {
                let measured = cpu_utilisation
                    .and_then(|u| u.get(c.index))
                    .unwrap_or(0.0)
                    .clamp(0.0, 1.0);
                let load = max_load_after(c).max(measured);
                let fit = (0..4)
                    .filter(|&r| request[r] > 0.0)
                    .map(|r| request[r] / (c.remaining[r] + request[r]))
                    .fold(0.0, f64::max);
                let affinity = model.affinity.get(c.index).copied().unwrap_or(1.0);
                let predicted = model.tau
                    * affinity
                    * (1.0 + config.load_slowdown * load + config.fit_slowdown * fit);
                let risk = overrun_probability(predicted, *slack_s, config.runtime_cv);
                Some(Rank::score(
                    config.overrun_weight * risk + config.load_weight * load,
                ))
            }
        }
    }
}

/// P(runtime > slack) for a runtime normal around `predicted` with deviation
/// `cv * predicted` (the logistic approximation of the normal distribution).
pub fn overrun_probability(predicted: f64, slack_s: f64, cv: f64) -> f64 {
    let spread = (cv * predicted).max(1e-9);
    let z = (predicted - slack_s) / spread;
    1.0 / (1.0 + (-1.702 * z).exp())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use cloudai_policy_kit::Decision::{Assign, Unschedulable, Wait};

    struct Cluster {
        total: [Vec<f64>; 4],
        free: [Vec<f64>; 4],
        req: [Vec<f64>; 4],
    }

    fn cluster(workers: &[([f64; 4], [f64; 4])], tasks: &[[f64; 4]]) -> Cluster {
        let col = |rows: &mut dyn Iterator<Item = [f64; 4]>| {
            let rows: Vec<[f64; 4]> = rows.collect();
            [0, 1, 2, 3].map(|r| rows.iter().map(|x| x[r]).collect::<Vec<f64>>())
        };
        Cluster {
            total: col(&mut workers.iter().map(|w| w.0)),
            free: col(&mut workers.iter().map(|w| w.1)),
            req: col(&mut tasks.iter().copied()),
        }
    }

    fn round<'a>(
        c: &'a Cluster,
        info: Vec<TaskInfo<'a>>,
        history: HashMap<&'a str, History<'a>>,
    ) -> Round<'a> {
        Round {
            workers: Workers {
                total: [&c.total[0], &c.total[1], &c.total[2], &c.total[3]],
                available: [&c.free[0], &c.free[1], &c.free[2], &c.free[3]],
            },
            tasks: Tasks {
                request: [&c.req[0], &c.req[1], &c.req[2], &c.req[3]],
            },
            info,
            cpu_utilisation: None,
            history,
        }
    }

    /// The history of one task type: mean runtimes (and runs) where `known`.
    fn history<'a>(
        task_type: &'a str,
        known: &'a [bool],
        mean: &'a [f64],
        runs: Option<&'a [f64]>,
    ) -> HashMap<&'a str, History<'a>> {
        HashMap::from([(
            task_type,
            History {
                mean_runtime_s: Attribute {
                    known,
                    values: mean,
                },
                runs: runs.map(|values| Attribute { known, values }),
            },
        )])
    }

    fn info(task_type: &str) -> TaskInfo<'_> {
        TaskInfo {
            task_type,
            sla_multiplier: None,
            age_s: 0.0,
        }
    }

    const IDLE: [f64; 4] = [8.0, 16.0, 100.0, 0.0];

    #[test]
    fn prefers_the_worker_that_meets_the_deadline() {
        // Worker 0 is the tighter fit (best-fit's choice) but ran "train" 3x slower than
        // worker 1: with k = 2 only worker 1 meets the deadline.
        let c = cluster(
            &[
                ([4.0, 8.0, 100.0, 0.0], [4.0, 8.0, 100.0, 0.0]),
                (IDLE, IDLE),
            ],
            &[[2.0, 4.0, 1.0, 0.0]],
        );
        let (known, mean, runs) = ([true, true], [30.0, 10.0], [5.0, 5.0]);
        let r = round(
            &c,
            vec![info("train")],
            history("train", &known, &mean, Some(&runs)),
        );
        assert_eq!(place(&r, &Config::default()), vec![Assign(1)]);
        // Best-fit would have packed it onto worker 0.
        let fit = cloudai_policy_best_fit::logic::place(&r.workers, &r.tasks);
        assert_eq!(fit, vec![Assign(0)]);
    }

    #[test]
    fn a_task_that_waited_goes_where_it_finishes_soonest() {
        // Both workers meet a fresh task's deadline, and the slower one is less loaded: a
        // fresh task goes there; the same task after waiting most of its slack goes to the
        // faster one.
        let c = cluster(
            &[(IDLE, IDLE), (IDLE, [4.0, 8.0, 100.0, 0.0])],
            &[[1.0, 1.0, 0.0, 0.0]],
        );
        let (known, mean, runs) = ([true, true], [14.0, 8.0], [10.0, 10.0]);
        let etl = || history("etl", &known, &mean, Some(&runs));
        let fresh = round(&c, vec![info("etl")], etl());
        assert_eq!(place(&fresh, &Config::default()), vec![Assign(0)]);
        let late = round(
            &c,
            vec![TaskInfo {
                age_s: 10.0,
                ..info("etl")
            }],
            etl(),
        );
        assert_eq!(place(&late, &Config::default()), vec![Assign(1)]);
    }

    #[test]
    fn degrades_to_best_fit_without_history() {
        let workers = [
            (IDLE, IDLE),
            ([4.0, 8.0, 100.0, 0.0], [4.0, 8.0, 100.0, 0.0]),
            ([16.0, 64.0, 100.0, 2.0], [6.0, 60.0, 50.0, 2.0]),
            ([8.0, 16.0, 100.0, 0.0], [1.0, 2.0, 100.0, 0.0]),
        ];
        let tasks = [
            [1.0, 1.0, 1.0, 0.0],
            [2.0, 4.0, 10.0, 0.0],
            [4.0, 8.0, 0.0, 1.0],
            [3.0, 3.0, 3.0, 0.0],
            [64.0, 1.0, 0.0, 0.0],
            [8.0, 1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5, 0.0],
        ];
        let c = cluster(&workers, &tasks);
        // A history of another type only: every task here has none.
        let (known, mean) = ([true, false, false, false], [5.0, 0.0, 0.0, 0.0]);
        let r = round(
            &c,
            tasks.iter().map(|_| info("new")).collect(),
            history("other", &known, &mean, None),
        );
        let expected = cloudai_policy_best_fit::logic::place(&r.workers, &r.tasks);
        assert_eq!(place(&r, &Config::default()), expected);
        assert!(matches!(expected[4], Unschedulable(_)));
        assert!(expected.iter().any(|d| matches!(d, Wait(_))));
    }

    #[test]
    fn one_lucky_run_is_shrunk_towards_the_mean() {
        let (known, mean, runs) = ([true, true], [1.0, 10.0], [1.0, 99.0]);
        let h = History {
            mean_runtime_s: Attribute {
                known: &known,
                values: &mean,
            },
            runs: Some(Attribute {
                known: &known,
                values: &runs,
            }),
        };
        let m = TypeModel::learn(&h, 3, 2.0).unwrap();
        assert!((m.tau - 9.91).abs() < 1e-9);
        // One run at 1 s: (1 * 0.1 + 2) / 3 = 0.7, not 0.1; never ran: 1.
        assert!((m.affinity[0] - (1.0 / 9.91 + 2.0) / 3.0).abs() < 1e-9);
        assert_eq!(m.affinity[2], 1.0);
        let none = History {
            mean_runtime_s: Attribute {
                known: &[false, false],
                values: &[0.0, 0.0],
            },
            runs: None,
        };
        assert_eq!(TypeModel::learn(&none, 2, 2.0), None);
    }

    #[test]
    fn never_assigns_beyond_free_capacity_and_accounts_for_the_batch() {
        let c = cluster(
            &[
                (IDLE, [2.0, 4.0, 100.0, 0.0]),
                (IDLE, [1.0, 16.0, 100.0, 0.0]),
            ],
            &[[1.0, 1.0, 0.0, 0.0]; 4],
        );
        let (known, mean) = ([true, true], [1.0, 1.0]);
        let r = round(&c, vec![info("t"); 4], history("t", &known, &mean, None));
        let d = place(&r, &Config::default());
        let on = |w: u32| d.iter().filter(|x| **x == Assign(w)).count();
        assert_eq!((on(0), on(1)), (2, 1));
        assert!(matches!(d[3], Wait(_)));
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
        let c = Config::parse(r#"{"sla_multiplier": 3, "load_weight": 0}"#).unwrap();
        assert_eq!((c.sla_multiplier, c.load_weight), (3.0, 0.0));
        for bad in [
            r#"{"sla_multiplier": 0}"#,
            r#"{"runtime_cv": -1}"#,
            r#"{"load_weight": -0.5}"#,
            r#"{"deadline": 3}"#,
            r#"{"prior_runs": "many"}"#,
            "[]",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrun_probability_is_a_smooth_step_at_the_deadline() {
        assert!((overrun_probability(10.0, 10.0, 0.25) - 0.5).abs() < 1e-12);
        assert!(overrun_probability(5.0, 10.0, 0.25) < 0.01);
        assert!(overrun_probability(15.0, 10.0, 0.25) > 0.9);
        assert!(overrun_probability(1.0, -3.0, 0.25) > 0.999);
    }
}
