//! The stage graph: inputs resolved to stages, dangling inputs and cycles reported, and a
//! topological order to run in.

use std::collections::HashMap;

use petgraph::algo::{has_path_connecting, tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::config::node::suggest;
use crate::config::{Diagnostic, PipelineFile};

pub struct Dag {
    pub graph: DiGraph<usize, ()>,
    /// Stage indices (into `PipelineFile::stages`) in an order where inputs come first.
    pub order: Vec<usize>,
}

impl Dag {
    /// Build the graph of a pipeline's stages, reporting every bad reference and cycle.
    pub fn build(file: &PipelineFile) -> Result<Dag, Vec<Diagnostic>> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..file.stages.len()).map(|i| graph.add_node(i)).collect();
        let by_name: HashMap<&str, usize> = file
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let names: Vec<&str> = file.stages.iter().map(|s| s.name.as_str()).collect();
        let mut errors = Vec::new();
        for (i, stage) in file.stages.iter().enumerate() {
            for (input, loc) in &stage.inputs {
                match by_name.get(input.as_str()) {
                    Some(&from) => {
                        graph.add_edge(nodes[from], nodes[i], ());
                    }
                    None => errors.push(
                        Diagnostic::new(
                            &file.path,
                            Some(*loc),
                            format!(
                                "stage `{}` reads `{input}`, which is not a stage",
                                stage.name
                            ),
                        )
                        .hint(suggest(input, &names, "stages")),
                    ),
                }
            }
        }
        for component in tarjan_scc(&graph) {
            let is_cycle = component.len() > 1 || graph.contains_edge(component[0], component[0]);
            if !is_cycle {
                continue;
            }
            let mut members: Vec<usize> = component.iter().map(|n| graph[*n]).collect();
            members.sort_unstable();
            let first = &file.stages[members[0]];
            let loop_names = members
                .iter()
                .map(|&m| format!("`{}`", file.stages[m].name))
                .collect::<Vec<_>>()
                .join(", ");
            let loc = first.inputs.first().map_or(first.name_loc, |(_, loc)| *loc);
            errors.push(
                Diagnostic::new(
                    &file.path,
                    Some(loc),
                    format!("stages {loop_names} read each other in a cycle"),
                )
                .hint("a stage can only read stages that do not depend on it"),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let order = toposort(&graph, None)
            .map_err(|_| Vec::new())?
            .into_iter()
            .map(|n| graph[n])
            .collect::<Vec<_>>();
        // Keep the file's order wherever the graph allows it: a stable, readable run order.
        let mut order = order;
        order.sort_by_key(|&i| {
            let depth = depth(&graph, nodes[i]);
            (depth, i)
        });
        Ok(Dag { graph, order })
    }

    /// Whether stage `a` feeds (directly or not) stage `b`.
    pub fn feeds(&self, a: usize, b: usize) -> bool {
        a != b && has_path_connecting(&self.graph, NodeIndex::new(a), NodeIndex::new(b), None)
    }
}

/// The longest path from a source to `node` (the graph is acyclic here).
fn depth(graph: &DiGraph<usize, ()>, node: NodeIndex) -> usize {
    graph
        .neighbors_directed(node, petgraph::Direction::Incoming)
        .map(|n| depth(graph, n) + 1)
        .max()
        .unwrap_or(0)
}
