"""The models (stages prepare_teacher and init_student): loading and adapting the teacher,
building the initial student. Builds on kd/core and kd/data."""
