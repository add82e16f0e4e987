//! Process groups for samtrain: implementations of the model's `Collective`
//! interface across processes.
