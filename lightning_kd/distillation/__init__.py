"""DistillationModule and what only it uses: student construction, the teacher cache, the discrepancy it logs,
and the checks that the data fits the models."""

from lightning_kd.distillation.module import DistillationModule
from lightning_kd.distillation.students import StudentSpec, build_student, register_student_init
from lightning_kd.distillation.teacher_cache import TeacherCache

__all__ = ["DistillationModule", "StudentSpec", "TeacherCache", "build_student", "register_student_init"]
